"""Oracle PSNR / L1 against hand computations, whole image and per part."""

from __future__ import annotations

import math

import pytest
import torch

from midms_cli.metrics.oracle import PSNR_CAP, OracleAccumulator, psnr


def test_psnr_of_a_uniform_offset_matches_hand_computation():
    oracle = torch.zeros(1, 3, 4, 4)
    prediction = oracle + 0.2  # 0.1 on the [0, 1] scale -> MSE 0.01 -> 20 dB
    assert float(psnr(prediction, oracle)[0]) == pytest.approx(20.0)
    assert float(psnr(oracle, oracle)[0]) == PSNR_CAP


def test_accumulator_whole_image_and_parts():
    oracle = torch.zeros(2, 3, 4, 4)
    prediction = oracle.clone()
    prediction[0, :, :2] = 1.0  # top half of image 0 is off by 0.5 on the [0, 1] scale
    masks = torch.zeros(2, 2, 4, 4, dtype=torch.bool)
    masks[:, 0, :2] = True  # part "top"
    masks[0, 1, 2:] = True  # part "bottom" exists only in image 0
    accumulator = OracleAccumulator(["top", "bottom"])
    accumulator.add(prediction, oracle, masks)
    result = accumulator.result("output")
    # image 0: MSE 0.125, L1 0.25; image 1: perfect
    assert result["output_psnr"] == pytest.approx((-10 * math.log10(0.125) + PSNR_CAP) / 2)
    assert result["output_l1"] == pytest.approx(0.125)
    assert result["output_l1_top"] == pytest.approx(0.25)  # (0.5 + 0) / 2 images
    assert result["output_psnr_bottom"] == PSNR_CAP  # only image 0 has the part, and it is exact there
    assert result["output_l1_bottom"] == 0.0


def test_mask_count_must_match_part_names():
    accumulator = OracleAccumulator(["a"])
    with pytest.raises(ValueError, match="2 part masks for 1 part names"):
        accumulator.add(
            torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2), torch.ones(1, 2, 2, 2, dtype=torch.bool)
        )


def test_part_colour_error_compares_mean_colours_per_region_by_hand():
    from midms_cli.metrics.oracle import PartColourAccumulator, part_mean_colours

    # A 1x2 image: left pixel region 0, right pixel region 1. Colours on [0, 1] = (x + 1) / 2.
    labels = torch.tensor([[[0, 1]]])
    oracle = torch.zeros(1, 3, 1, 2)  # every value 0.5
    prediction = oracle.clone()
    prediction[0, :, 0, 1] = torch.tensor([1.0, 0.0, 0.0])  # region 1: (1.0, 0.5, 0.5)
    colours, pixels = part_mean_colours(prediction, labels, 3)
    assert pixels.tolist() == [[1.0, 1.0, 0.0]]
    assert colours[0, 1].tolist() == pytest.approx([1.0, 0.5, 0.5])
    accumulator = PartColourAccumulator(["a", "b", "absent"])
    accumulator.add(prediction, oracle, labels)
    result = accumulator.result()
    # Region a: distance 0; region b: 0.5; region "absent" has no pixels and is skipped.
    assert result["part_colour_error"] == pytest.approx(0.25)
    assert result["part_colour_error_b"] == pytest.approx(0.5) and "part_colour_error_absent" not in result
