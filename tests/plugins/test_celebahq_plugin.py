"""celebahq plugin end to end on a tiny CelebAMask-HQ folder written in the real layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from midms_plugins.celebahq import PLUGIN
from PIL import Image
from typer.testing import CliRunner

from midms_cli.cli.app import app
from midms_cli.conditions.celebahq import CELEBAHQ_PARTS, load_part_masks, render_celebahq
from midms_cli.data.shards import iterate_samples, read_index
from midms_cli.errors import MidmsError
from midms_cli.pipelines.prepare import PrepareConfig, prepare

SIZE = 16


def write_celebamask(root, ids=(0, 1, 2, 2001)):
    """CelebA-HQ-img/{id}.jpg and CelebAMask-HQ-mask-anno/{id // 2000}/{id:05d}_{part}.png (0/255)."""
    rng = np.random.default_rng(0)
    (root / "CelebA-HQ-img").mkdir(parents=True)
    yy, xx = np.mgrid[:32, :32]
    for image_id in ids:
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            root / "CelebA-HQ-img" / f"{image_id}.jpg"
        )
        folder = root / "CelebAMask-HQ-mask-anno" / str(image_id // 2000)
        folder.mkdir(parents=True, exist_ok=True)
        for k, part in enumerate(("skin", "l_eye", "hair")):
            inside = (yy - 10 - 3 * k - image_id % 3) ** 2 + (xx - 16) ** 2 < (12 - 4 * k) ** 2
            Image.fromarray((inside * 255).astype(np.uint8)).save(folder / f"{image_id:05d}_{part}.png")
    (root / "train.txt").write_text("0\n1\n2\n")
    (root / "val.txt").write_text("2001\n")
    (root / "celebahq_ref.txt").write_text(
        "0.jpg,1.jpg,2.jpg\n1.jpg,2.jpg,0.jpg\n2.jpg,0.jpg,1.jpg\n2001.jpg,0.jpg,1.jpg\n"
    )


def run(source, out, **options):
    lists = {
        "train_list": source / "train.txt",
        "val_list": source / "val.txt",
        "ref_list": source / "celebahq_ref.txt",
    }
    config = PrepareConfig(dataset="celebahq", out=out, source=source, size=SIZE, shard_size=2,
                           options={**lists, **options}, strict=True)  # fmt: skip
    return prepare(config, PLUGIN)


def test_official_recipe_from_part_masks_with_cocosnet_lists(tmp_path):
    source = tmp_path / "CelebAMask-HQ"
    write_celebamask(source)
    result = run(source, tmp_path / "out", hard_probability=0.4, self_probability=0.3)
    assert result["splits"] == {"train": {"count": 3, "shards": 2, "skipped": 0},
                                "val": {"count": 1, "shards": 1, "skipped": 0}}  # fmt: skip
    assert read_index(tmp_path / "out", "train")["condition"]["channels"] == 15
    references = {"0.jpg": ["1.jpg", "2.jpg"], "1.jpg": ["2.jpg", "0.jpg"], "2.jpg": ["0.jpg", "1.jpg"]}
    for sample in iterate_samples(tmp_path / "out", "train"):
        meta = sample["meta"]
        expected_ref = {
            "easy": references[meta["id"]][0],
            "hard": references[meta["id"]][-1],
            "self": meta["id"],
        }
        assert meta["ref_id"] == expected_ref[meta["pairing"]]
        image_id = int(meta["id"].split(".")[0])
        folder = source / "CelebAMask-HQ-mask-anno" / "0"
        masks = load_part_masks(
            {p: folder / f"{image_id:05d}_{p}.png" for p in ("skin", "l_eye", "hair")}, SIZE
        )
        photo = (
            Image.open(source / "CelebA-HQ-img" / meta["id"])
            .convert("RGB")
            .resize((SIZE, SIZE), Image.BILINEAR)
        )
        image = torch.from_numpy(np.asarray(photo).copy()).permute(2, 0, 1).float() / 127.5 - 1
        assert torch.equal(sample["image"], image)
        assert torch.allclose(sample["cond"], render_celebahq(masks[None], image[None])[0], atol=0.5 / 255)
        assert meta["source"]["image"].endswith(meta["id"])
    (val,) = iterate_samples(tmp_path / "out", "val")
    assert (
        val["meta"]["id"] == "2001.jpg"
        and val["meta"]["pairing"] == "easy"
        and val["meta"]["ref_id"] == "0.jpg"
    )
    assert "1" in val["meta"]["source"]["masks"]  # id 2001 lives in mask folder 2001 // 2000 = 1


def test_canny_variant_needs_no_masks(tmp_path):
    source = tmp_path / "src"
    write_celebamask(source)
    import shutil

    shutil.rmtree(source / "CelebAMask-HQ-mask-anno")
    run(source, tmp_path / "out", variant="canny")
    sample = next(iter(iterate_samples(tmp_path / "out", "train")))
    assert sample["cond"].shape == (1, SIZE, SIZE) and set(sample["cond"].unique().tolist()) <= {0.0, 1.0}


def test_missing_part_masks_name_the_expected_file(tmp_path):
    source = tmp_path / "src"
    write_celebamask(source)
    for path in (source / "CelebAMask-HQ-mask-anno" / "1").glob("*.png"):
        path.unlink()
    with pytest.raises(
        MidmsError, match=r"no part masks for 2001.jpg: expected files like .*1/02001_skin.png"
    ):
        run(source, tmp_path / "out")


def test_malformed_mask_is_one_line_naming_the_file(tmp_path, capsys):
    source = tmp_path / "src"
    write_celebamask(source)
    bad = source / "CelebAMask-HQ-mask-anno" / "0" / "00001_hair.png"
    bad.write_text("not a png")
    args = ["prepare", "celebahq", "--source", str(source), "--out", str(tmp_path / "out"), "--size", "16",
            "--split", "train", "--strict", "--train-list", str(source / "train.txt")]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, MidmsError)
    message = str(result.exception)
    assert "\n" not in message and str(bad) in message


def test_wrong_source_folder_is_a_clear_error(tmp_path):
    with pytest.raises(MidmsError, match="CelebA-HQ-img.*not found"):
        run(tmp_path, tmp_path / "out")
    assert CELEBAHQ_PARTS[0] == "skin"


def test_channel_zero_is_the_official_loaders_on_the_files(tmp_path):
    """The official loader's channel 0 recomputed from the files with PIL and scikit-image."""
    from skimage import feature

    source = tmp_path / "CelebAMask-HQ"
    write_celebamask(source)
    run(source, tmp_path / "out", hard_probability=0.0, self_probability=0.0)
    samples = {s["meta"]["id"]: s for s in iterate_samples(tmp_path / "out", "train")}
    for image_id in (0, 1, 2):
        photo = Image.open(source / "CelebA-HQ-img" / f"{image_id}.jpg").resize((SIZE, SIZE), Image.BILINEAR)
        inner = np.ones((SIZE, SIZE), np.uint8)
        edges = np.zeros((SIZE, SIZE), bool)
        for part in CELEBAHQ_PARTS:
            path = source / "CelebAMask-HQ-mask-anno" / "0" / f"{image_id:05d}_{part}.png"
            if not path.exists():
                continue
            label = np.array(Image.open(path).convert("L").resize((SIZE, SIZE), Image.NEAREST))
            inner[label == 255] = 1 if part == "hair" else 0
            step_x, step_y = label[:, 1:] != label[:, :-1], label[1:, :] != label[:-1, :]
            edges[:, 1:] |= step_x
            edges[:, :-1] |= step_x
            edges[1:, :] |= step_y
            edges[:-1, :] |= step_y
        canny = feature.canny(np.array(photo.convert("L"))) & (inner == 1)
        sample = samples[f"{image_id}.jpg"]
        assert canny.any()
        assert np.array_equal(sample["cond"][0].numpy() > 0.5, edges | canny)
