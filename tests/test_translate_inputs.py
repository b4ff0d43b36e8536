"""`midms translate` cannot be misused silently: photos as condition maps, non-square inputs,
sizes other than the training one, the condition it used, and the sampler it reports."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_translate import SIZE, micro_config, run

import midms_cli.cli.translate as translate_cli
from midms_cli.config import SamplingConfig
from midms_cli.errors import MidmsError
from midms_cli.models.midm import MIDM
from midms_cli.pipelines import inputs
from midms_cli.pipelines.translate import describe_sampler, save_midm


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    save_midm(root / "model.safetensors", MIDM(micro_config()))
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(photo).save(root / "photo.png")
    Image.fromarray(photo).save(root / "photo.jpg")
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / "ref.png")
    edges = np.zeros((SIZE, SIZE), dtype=np.uint8)
    edges[8:24, 12] = 255
    edges[16, 4:28] = 255
    Image.fromarray(edges).save(root / "cond.png")
    Image.fromarray(255 - edges).save(root / "inverted.png")
    wide = np.zeros((SIZE, 2 * SIZE), dtype=np.uint8)
    wide[:, SIZE // 2 + 3 : SIZE // 2 + 5] = 255  # a two-pixel vertical edge inside the centred square
    Image.fromarray(wide).save(root / "wide.png")
    return root


def _translate(files, tmp_path, capsys, *args, condition="cond.png", json_output=False):
    argv = ["--json"] if json_output else []
    argv += ["translate", str(files / condition), str(files / "ref.png"), "-o", str(tmp_path / "out.png")]
    argv += ["--model", str(files / "model.safetensors"), "--refine", "none", *args]
    return run(argv, capsys)


def test_a_photo_png_without_extract_is_refused_with_the_hint(files, tmp_path, capsys):
    code, out, err = _translate(files, tmp_path, capsys, condition="photo.png")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "is not a binary edge map" in err and "add --extract" in err
    assert not (tmp_path / "out.png").exists()


def test_a_jpg_condition_names_png_and_the_extract_hint(files, tmp_path, capsys):
    code, out, err = _translate(files, tmp_path, capsys, condition="photo.jpg")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert ".png" in err and "add --extract" in err


def test_an_inverted_edge_map_is_refused(files, tmp_path, capsys):
    code, out, err = _translate(files, tmp_path, capsys, condition="inverted.png")
    assert code == 2 and "white edges on black" in err


def test_the_photo_is_accepted_with_extract(files, tmp_path, capsys):
    code, out, err = _translate(files, tmp_path, capsys, "--extract", condition="photo.jpg")
    assert code == 0, err
    assert (tmp_path / "out.png").is_file()


def test_label_kinds_refuse_an_rgb_photo(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    with pytest.raises(MidmsError, match="not a 'ade20k' label map.*add --extract"):
        inputs.check_condition_image(tmp_path / "photo.png", "ade20k")
    with pytest.raises(MidmsError, match="cannot be computed from a photo"):
        inputs.check_condition_image(tmp_path / "photo.png", "celebahq-edges")


def test_label_kinds_refuse_a_grey_photo(tmp_path):
    grey = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    message = r"not a 'ade20k' label map \(\d+% of its pixels are no class id 0..150"
    with pytest.raises(MidmsError, match=message):
        inputs.check_condition_image(tmp_path / "grey.png", "ade20k")
    labels = np.full((16, 16), 255, dtype=np.uint8)
    labels[4:8] = 3
    Image.fromarray(labels).save(tmp_path / "labels.png")
    inputs.check_condition_image(tmp_path / "labels.png", "ade20k")  # ids and 255 (unknown) pass
    Image.fromarray(np.full((16, 16), 13, dtype=np.uint8)).save(tmp_path / "parts.png")
    inputs.check_condition_image(tmp_path / "parts.png", "celebahq-edges")  # 13 = hair, the last part


def test_an_antialiased_edge_map_still_passes(tmp_path):
    """An edge map resized with a smooth filter has grey pixels along its edges, well below the limit."""
    edges = np.zeros((64, 64), dtype=np.uint8)
    edges[10:50, 20] = 255
    edges[30, 5:60] = 255
    Image.fromarray(edges).resize((48, 48), Image.Resampling.BILINEAR).save(tmp_path / "soft.png")
    inputs.check_condition_image(tmp_path / "soft.png", "canny")


def test_fit_box_by_hand():
    assert inputs.fit_box(4, 10, "crop") == (0, 3, 0, 3)
    assert inputs.fit_box(4, 9, "pad") == (2, 0, 3, 0)
    assert inputs.fit_box(5, 5, "crop") == inputs.fit_box(5, 9, "squash") == (0, 0, 0, 0)
    square = inputs.fit_array(np.arange(12).reshape(2, 6), "crop", fill="edge")
    np.testing.assert_array_equal(square, [[2, 3], [8, 9]])
    padded = inputs.fit_array(np.array([[1, 2, 3]]), "pad", fill="edge")
    np.testing.assert_array_equal(padded, [[1, 2, 3]] * 3)
    zeros = inputs.fit_tensor(torch.ones(1, 1, 3), "pad")
    assert zeros.tolist() == [[[0, 0, 0], [1, 1, 1], [0, 0, 0]]]


def test_non_square_inputs_are_center_cropped_with_a_note(files, tmp_path, capsys):
    saved = tmp_path / "used.png"
    code, out, err = _translate(files, tmp_path, capsys, "--save-condition", str(saved), condition="wide.png")
    assert code == 0, err
    assert f"{files / 'wide.png'} is {2 * SIZE}x{SIZE}, not square: center-cropped to {SIZE}x{SIZE}" in err
    used = np.asarray(Image.open(saved))
    assert used.shape == (SIZE, SIZE)  # the centred square, at full resolution: the edge is in column 3
    assert np.flatnonzero(used.max(axis=0)).tolist() == [3, 4]


@pytest.mark.parametrize("fit", ["pad", "squash"])
def test_pad_and_squash_keep_the_whole_input(files, tmp_path, capsys, fit):
    saved = tmp_path / "used.png"
    code, out, err = _translate(
        files, tmp_path, capsys, "--resize", fit, "--save-condition", str(saved), condition="wide.png"
    )
    assert code == 0, err
    used = np.asarray(Image.open(saved))
    # The edge at columns 19-20 of 64 lands at column 10 of the 32 px square either way (nearest).
    assert np.flatnonzero(used.max(axis=0)).tolist() == [(SIZE // 2 + 4) // 2]
    if fit == "pad":
        assert used[: SIZE // 4].max() == 0 and "padded to" in err  # zero rows above: no edge
    else:
        assert "squashed to a square" in err


def test_the_saved_condition_reads_back_to_the_same_image(files, tmp_path, capsys):
    saved = tmp_path / "edges.png"
    code, _, err = _translate(files, tmp_path, capsys, "--extract", "--save-condition", str(saved),
                              condition="photo.png")
    assert code == 0, err
    first = np.asarray(Image.open(tmp_path / "out.png"))
    code, _, err = run(["translate", str(saved), str(files / "ref.png"), "-o", str(tmp_path / "again.png"),
                        "--model", str(files / "model.safetensors"), "--refine", "none"], capsys)
    assert code == 0, err
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "again.png")), first)


def test_save_condition_is_checked_before_any_work(files, tmp_path, capsys):
    code, _, err = _translate(files, tmp_path, capsys, "--save-condition", str(tmp_path / "c.jpg"))
    assert code == 2 and "--save-condition" in err and ".npy" in err
    assert not (tmp_path / "out.png").exists()


def test_a_size_other_than_the_training_size_warns(files, tmp_path, capsys):
    code, _, err = _translate(files, tmp_path, capsys, "--size", str(2 * SIZE))
    assert code == 0, err
    assert f"warning: --size {2 * SIZE} differs from the model's training size {SIZE}" in err
    code, _, err = _translate(files, tmp_path, capsys, "--size", str(SIZE))
    assert code == 0 and "warning" not in err


def test_the_json_reports_the_sampler_that_ran(files, tmp_path, capsys):
    code, out, err = _translate(files, tmp_path, capsys, json_output=True)
    assert code == 0, err
    sampler = json.loads(out)["sampler"]
    # --refine none departs from the official settings: the report must not call it "official".
    assert sampler["name"] == "custom" and sampler["differs_from_official"] == {"refine": "none"}
    assert describe_sampler(SamplingConfig())["name"] == "official"
    assert describe_sampler(SamplingConfig())["differs_from_official"] == {}


def test_the_cli_spells_the_choices_of_their_modules():
    from midms_cli.config import SAMPLING_BUNDLES
    from midms_cli.models.midm import PRECISIONS
    from midms_cli.sampler import REFINERS

    assert translate_cli.SAMPLING_BUNDLES == tuple(SAMPLING_BUNDLES)
    assert translate_cli.PRECISIONS == PRECISIONS and translate_cli.REFINERS == REFINERS
    assert translate_cli.FITS == inputs.FITS
    from midms_cli.sampler import NOISE_ORDERS

    assert translate_cli.NOISE_ORDERS == NOISE_ORDERS
