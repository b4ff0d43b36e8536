"""deepfashion plugin: In-shop photos + OpenPose candidate/subset (or JSON) keypoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from midms_plugins.deepfashion import PLUGIN
from PIL import Image

from midms_cli.conditions.pose import render_pose_at_photo_size
from midms_cli.data.shards import iterate_samples
from midms_cli.errors import MidmsError
from midms_cli.pipelines.prepare import PrepareConfig, prepare

SIZE = 16
ITEMS = ("MEN/Denim/id_00000080/01_1_front.jpg", "WOMEN/Dresses/id_00000002/02_1_front.jpg")


def keypoints_for(k):
    """18 keypoints in 32-pixel photo coordinates; keypoint 3 missing."""
    points = np.stack([np.linspace(4 + k, 28, 18), np.linspace(3, 29 - k, 18), np.full(18, 0.9)], 1)
    points[3] = -1
    return points


def write_deepfashion(root):
    rng = np.random.default_rng(0)
    for k, item in enumerate(ITEMS):
        photo = root / "img" / item
        photo.parent.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(photo)
        stem = (root / "pose" / item).with_suffix("")
        stem.parent.mkdir(parents=True)
        points = keypoints_for(k)
        if (
            k == 0
        ):  # pytorch-openpose text files: candidate rows x y score id; subset 18 indices + score + count
            present = [i for i in range(18) if points[i, 2] >= 0]
            rows = [f"{points[i, 0]} {points[i, 1]} {points[i, 2]} {n}" for n, i in enumerate(present)]
            stem.with_name(f"{stem.name}_candidate.txt").write_text("\n".join(rows) + "\n")
            indices = [present.index(i) if i in present else -1 for i in range(18)]
            subset = " ".join(map(str, indices + [15.3, 17]))  # + total score + keypoint count
            stem.with_name(f"{stem.name}_subset.txt").write_text(subset + "\n")
        else:  # OpenPose JSON, COCO-18, confidence 0 = missing
            flat = [float(v) for x, y, c in points for v in ((x, y, c) if c >= 0 else (0, 0, 0))]
            (stem.parent / f"{stem.name}_keypoints.json").write_text(
                json.dumps({"people": [{"pose_keypoints_2d": flat}]})
            )
    (root / "deepfashion_ref.txt").write_text(f"{ITEMS[0]},{ITEMS[1]}\n{ITEMS[1]},{ITEMS[0]}\n")


def run(source, out, **options):
    options = {"val_fraction": 0.0, "ref_list": source / "deepfashion_ref.txt", **options}
    config = PrepareConfig(dataset="deepfashion", out=out, source=source, size=SIZE, splits=("train",),
                           options=options, strict=True)  # fmt: skip
    return prepare(config, PLUGIN)


def test_pose_condition_from_text_and_json_keypoints_drawn_at_the_photo_size(tmp_path):
    write_deepfashion(tmp_path / "df")
    run(tmp_path / "df", tmp_path / "out", hard_probability=0.0, self_probability=0.0)
    samples = {s["meta"]["id"]: s for s in iterate_samples(tmp_path / "out", "train")}
    assert sorted(samples) == sorted(ITEMS)
    for k, item in enumerate(ITEMS):
        # Drawn on the 32 px photo's own grid, then resized (the official loader's route).
        expected = render_pose_at_photo_size(torch.tensor(keypoints_for(k)), (32, 32), SIZE)
        assert samples[item]["cond"].shape == (20, SIZE, SIZE)
        assert torch.allclose(samples[item]["cond"], expected, atol=0.5 / 255)
        # Spec 3.1, DeepFashion: the easy reference is the LAST entry of the line.
        assert samples[item]["meta"]["ref_id"] == ITEMS[1 - k]
    assert (
        "candidate" in samples[ITEMS[0]]["meta"]["source"]
        and "keypoints" in samples[ITEMS[1]]["meta"]["source"]
    )


def test_hard_reference_is_a_random_training_image(tmp_path):
    write_deepfashion(tmp_path / "df")
    run(tmp_path / "df", tmp_path / "out", hard_probability=1.0, self_probability=0.0)
    for sample in iterate_samples(tmp_path / "out", "train"):
        assert sample["meta"]["pairing"] == "hard" and sample["meta"]["ref_id"] in ITEMS


def test_missing_keypoints_say_which_file_and_that_no_estimator_exists(tmp_path):
    write_deepfashion(tmp_path / "df")
    (tmp_path / "df" / "pose" / ITEMS[1]).with_name("02_1_front_keypoints.json").unlink()
    with pytest.raises(
        MidmsError, match=r"no OpenPose keypoints for .*02_1_front.jpg: expected .*_candidate.txt"
    ):
        run(tmp_path / "df", tmp_path / "out")


def test_malformed_candidate_file_names_the_file(tmp_path):
    write_deepfashion(tmp_path / "df")
    bad = tmp_path / "df" / "pose" / "MEN/Denim/id_00000080/01_1_front_candidate.txt"
    bad.write_text("1 2 three\n")
    with pytest.raises(MidmsError, match="01_1_front_candidate.txt"):
        run(tmp_path / "df", tmp_path / "out")
