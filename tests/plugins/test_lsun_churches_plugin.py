"""lsun-churches plugin: photos + same-name ADE20K label PNGs -> 151-channel one-hot."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from midms_plugins.lsun_churches import PLUGIN
from PIL import Image

from midms_cli.data.shards import iterate_samples, read_index
from midms_cli.errors import MidmsError
from midms_cli.pipelines.prepare import PrepareConfig, prepare

SIZE = 8


def write_lsun(root):
    """The official layout: training/ and validation/ with name.jpg + name.png (ids; 255 = unknown)."""
    rng = np.random.default_rng(0)
    labels = {}
    for split, names in (("training", ("a", "b", "c")), ("validation", ("d",))):
        (root / split).mkdir(parents=True)
        for name in names:
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(
                root / split / f"{name}.jpg"
            )
            ids = rng.choice([0, 3, 17, 149, 255], size=(SIZE, SIZE)).astype(np.uint8)
            Image.fromarray(ids, mode="L").save(root / split / f"{name}.png")
            labels[f"{split}/{name}.jpg"] = ids
    return labels


def run(source, out, strict=True):
    config = PrepareConfig(dataset="lsun-churches", out=out, source=source, size=SIZE, strict=strict)
    return prepare(config, PLUGIN)


def test_label_maps_become_exact_one_hot_and_folders_give_the_split(tmp_path):
    labels = write_lsun(tmp_path / "src")
    result = run(tmp_path / "src", tmp_path / "out")
    assert result["splits"]["train"]["count"] == 3 and result["splits"]["val"]["count"] == 1
    assert read_index(tmp_path / "out", "val")["condition"] == {
        "kind": "ade20k", "channels": 151, "encoding": "npy.gz uint8 / 255",
    }  # fmt: skip
    for split in ("train", "val"):
        for sample in iterate_samples(tmp_path / "out", split):
            ids = torch.from_numpy(labels[sample["meta"]["id"]].astype(np.int64))
            ids[ids == 255] = 150  # spec 3.4: unknown
            assert sample["cond"].shape == (151, SIZE, SIZE)
            assert torch.equal(sample["cond"].argmax(0), ids) and torch.all(sample["cond"].sum(0) == 1)
            assert sample["meta"]["source"]["labels"].endswith(sample["meta"]["id"].replace(".jpg", ".png"))


def test_missing_label_map_names_the_file(tmp_path):
    write_lsun(tmp_path / "src")
    (tmp_path / "src" / "training" / "b.png").unlink()
    with pytest.raises(MidmsError, match=r"label map .*training/b.png not found"):
        run(tmp_path / "src", tmp_path / "out")


def test_colour_label_map_is_rejected_by_name(tmp_path):
    write_lsun(tmp_path / "src")
    Image.new("RGB", (SIZE, SIZE)).save(tmp_path / "src" / "validation" / "d.png")
    with pytest.raises(MidmsError, match=r"validation/d.png has mode RGB"):
        run(tmp_path / "src", tmp_path / "out")


def test_out_of_range_label_id_is_rejected_by_name(tmp_path):
    write_lsun(tmp_path / "src")
    Image.fromarray(np.full((SIZE, SIZE), 200, np.uint8), mode="L").save(
        tmp_path / "src" / "training" / "a.png"
    )
    with pytest.raises(MidmsError, match=r"training/a.png: .*200"):
        run(tmp_path / "src", tmp_path / "out")
