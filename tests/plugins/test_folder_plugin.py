"""folder plugin: any photos, Canny condition, split and references without lists."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from midms_plugins.folder import PLUGIN
from PIL import Image

from midms_cli.conditions.canny import canny_edges
from midms_cli.data.shards import iterate_samples
from midms_cli.errors import MidmsError
from midms_cli.pipelines.prepare import PrepareConfig, prepare

SIZE = 16


def photo(colour, seed):
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour)[None, None] + rng.integers(-20, 20, (24, 24, 3)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


def write_folder(root):
    (root / "reds").mkdir(parents=True)
    (root / "blues").mkdir()
    photo((220, 30, 30), 0).save(root / "reds" / "r1.jpg")
    photo((200, 40, 40), 1).save(root / "reds" / "r2.png")
    photo((30, 30, 220), 2).save(root / "blues" / "b1.jpg")
    photo((40, 40, 200), 3).convert("L").save(root / "blues" / "b2.png")  # grayscale is accepted
    (root / "notes.txt").write_text("not a photo, ignored")


def run(source, out, strict=True, **options):
    options = {"val_fraction": 0.0, "hard_probability": 0.0, "self_probability": 0.0, **options}
    config = PrepareConfig(dataset="folder", out=out, source=source, size=SIZE, shard_size=3,
                           splits=("train",), options=options, strict=strict)  # fmt: skip
    return prepare(config, PLUGIN)


def test_folder_of_photos_gets_canny_and_similarity_references(tmp_path):
    write_folder(tmp_path / "src")
    result = run(tmp_path / "src", tmp_path / "out")
    assert result["splits"]["train"]["count"] == 4
    samples = list(iterate_samples(tmp_path / "out", "train"))
    by_id = {s["meta"]["id"]: s for s in samples}
    assert sorted(by_id) == ["blues/b1.jpg", "blues/b2.png", "reds/r1.jpg", "reds/r2.png"]
    # All pairs are "easy": the most similar other photo is the one of the same colour.
    assert by_id["reds/r1.jpg"]["meta"]["ref_id"] == "reds/r2.png"
    assert by_id["blues/b1.jpg"]["meta"]["ref_id"] == "blues/b2.png"
    for sample in samples:
        assert sample["meta"]["pairing"] == "easy"
        assert torch.equal(sample["cond"], canny_edges(sample["image"][None])[0])
        assert torch.equal(sample["ref_cond"], canny_edges(sample["ref"][None])[0])


def test_hashed_split_is_stable_and_disjoint(tmp_path):
    write_folder(tmp_path / "src")
    options = {**{o.name: o.default for o in PLUGIN.options}, "val_fraction": 0.5}
    train = PLUGIN.items(tmp_path / "src", "train", options)
    val = PLUGIN.items(tmp_path / "src", "val", options)
    assert sorted(train + val) == ["blues/b1.jpg", "blues/b2.png", "reds/r1.jpg", "reds/r2.png"]
    assert not set(train) & set(val)


def test_broken_photo_is_skipped_with_its_name_or_fails_with_strict(tmp_path):
    write_folder(tmp_path / "src")
    (tmp_path / "src" / "reds" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(MidmsError, match=r"reds/broken.jpg"):
        run(tmp_path / "src", tmp_path / "strict", self_probability=1.0)
    lines = []
    config = PrepareConfig(dataset="folder", out=tmp_path / "lenient", source=tmp_path / "src", size=SIZE,
                           splits=("train",), options={"val_fraction": 0.0})  # fmt: skip
    result = prepare(config, PLUGIN, report=lines.append)
    assert result["splits"]["train"] == {"count": 4, "shards": 1, "skipped": 1}
    assert len(lines) == 1 and "broken.jpg" in lines[0]
    # The unreadable photo is nobody's exemplar either.
    assert all(
        s["meta"]["ref_id"] != "reds/broken.jpg" for s in iterate_samples(tmp_path / "lenient", "train")
    )


def test_bad_probabilities_fail_before_any_sample(tmp_path):
    write_folder(tmp_path / "src")
    with pytest.raises(MidmsError, match="sum to 1"):
        run(tmp_path / "src", tmp_path / "out", hard_probability=0.9, self_probability=0.9)
    assert not (tmp_path / "out" / "train").exists()


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("not a photo")
    with pytest.raises(MidmsError, match=r"no photos \(\.jpg, .*\.bmp\) under .*src; check --source"):
        run(tmp_path / "src", tmp_path / "out")
