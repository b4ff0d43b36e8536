"""Condition files: formats per kind, round trips and channel-count errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from midms_cli.conditions import CONDITIONS, extract_condition
from midms_cli.conditions.celebahq import render_celebahq
from midms_cli.conditions.io import load_condition, save_condition
from midms_cli.conditions.pose import render_pose
from midms_cli.errors import MidmsError


def test_registry_kinds_and_extraction():
    assert {k: s.channels for k, s in CONDITIONS.items()} == {
        "celebahq-edges": 15, "canny": 1, "openpose": 20, "ade20k": 151}  # fmt: skip
    assert [k for k, s in CONDITIONS.items() if s.extract_from_photo] == ["canny"]
    image = -torch.ones(1, 3, 16, 16)
    image[..., 8:] = 1
    assert extract_condition("canny", image).shape == (1, 1, 16, 16)
    with pytest.raises(MidmsError, match="cannot be computed from a photo"):
        extract_condition("ade20k", image)
    with pytest.raises(MidmsError, match="unknown condition kind 'sketch'"):
        extract_condition("sketch", image)


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_tensor_round_trip_any_kind(tmp_path, suffix):
    torch.manual_seed(0)
    condition = torch.round(torch.rand(15, 8, 8) * 255) / 255
    save_condition(condition, tmp_path / f"c{suffix}")
    assert torch.equal(load_condition(tmp_path / f"c{suffix}", "celebahq-edges"), condition)
    assert [p.name for p in tmp_path.iterdir()] == [f"c{suffix}"]  # no temporary file left behind


def test_uint8_npy_is_divided_by_255_and_resized(tmp_path):
    np.save(tmp_path / "e.npy", np.full((1, 4, 4), 255, np.uint8))
    loaded = load_condition(tmp_path / "e.npy", "canny", size=8)
    assert loaded.shape == (1, 8, 8) and (loaded == 1).all()


def test_wrong_channel_count_names_file_found_and_expected(tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((3, 4, 4), np.float32))
    message = r"bad\.npy: condition has 3 channels, a 'openpose' condition needs 20"
    with pytest.raises(MidmsError, match=message):
        load_condition(tmp_path / "bad.npy", "openpose")
    np.save(tmp_path / "flat.npy", np.zeros((4, 4), np.float32))
    with pytest.raises(MidmsError, match=r"flat\.npy: condition has shape \(4, 4\), a 'ade20k'"):
        load_condition(tmp_path / "flat.npy", "ade20k")


def test_canny_png_round_trip(tmp_path):
    edges = torch.zeros(1, 6, 6)
    edges[0, 2] = 1
    save_condition(edges, tmp_path / "edges.png")
    assert torch.equal(load_condition(tmp_path / "edges.png", "canny"), edges)


def test_ade20k_label_png(tmp_path):
    labels = np.array([[0, 7], [150, 255]], np.uint8)
    Image.fromarray(labels).save(tmp_path / "seg.png")
    one_hot = load_condition(tmp_path / "seg.png", "ade20k", size=4)
    assert one_hot.shape == (151, 4, 4)
    assert one_hot[7, 0, 2:].all() and one_hot[150, 2:].all() and one_hot.sum() == 16


def test_celebahq_part_label_png_renders_recipe_without_canny(tmp_path):
    labels = np.zeros((12, 12), np.uint8)
    labels[2:10, 2:10] = 1  # skin
    labels[4:6, 3:5] = 4  # l_eye
    Image.fromarray(labels).save(tmp_path / "parts.png")
    condition = load_condition(tmp_path / "parts.png", "celebahq-edges")
    ids = torch.from_numpy(labels.astype(np.int64))
    masks = (ids.unsqueeze(0) == torch.arange(1, 14).view(-1, 1, 1)).unsqueeze(0)
    assert torch.equal(condition, render_celebahq(masks)[0])
    Image.fromarray(np.full((4, 4), 20, np.uint8)).save(tmp_path / "bad.png")
    with pytest.raises(MidmsError, match="found 20"):
        load_condition(tmp_path / "bad.png", "celebahq-edges")


def test_openpose_from_json_and_candidate_files(tmp_path):
    flat = [0.0] * 54
    flat[3:6] = [100.0, 60.0, 0.9]  # neck
    flat[6:9] = [80.0, 62.0, 0.8]  # right shoulder
    (tmp_path / "p.json").write_text(json.dumps({"people": [{"pose_keypoints_2d": flat}]}))
    keypoints = torch.full((1, 18, 3), -1.0)
    keypoints[0, 1] = torch.tensor([100.0, 60.0, 0.9])
    keypoints[0, 2] = torch.tensor([80.0, 62.0, 0.8])
    expected = render_pose(keypoints, 256)[0]
    assert torch.equal(load_condition(tmp_path / "p.json", "openpose"), expected)
    assert load_condition(tmp_path / "p.json", "openpose", size=64).shape == (20, 64, 64)
    (tmp_path / "q_candidate.txt").write_text("100 60 0.9 0\n80 62 0.8 1\n")
    (tmp_path / "q_subset.txt").write_text(" ".join(["-1", "0", "1"] + ["-1"] * 15 + ["1.7", "2"]))
    assert torch.equal(load_condition(tmp_path / "q_candidate.txt", "openpose"), expected)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "stick.png")
    with pytest.raises(MidmsError, match="needs keypoints"):
        load_condition(tmp_path / "stick.png", "openpose")


def test_missing_file_and_unsupported_png_channels(tmp_path):
    with pytest.raises(MidmsError, match="does not exist"):
        load_condition(tmp_path / "nope.png", "canny")
    with pytest.raises(MidmsError, match="has 15"):
        save_condition(torch.zeros(15, 4, 4), tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()
