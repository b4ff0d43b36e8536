"""ADE20K one-hot (spec 3.4) and the preview palette."""

import pytest
import torch

from midms_cli.conditions.segmentation import ade20k_palette, colourise_ade20k, one_hot_ade20k


def test_one_hot_channels_and_unknown_255():
    labels = torch.tensor([[[0, 5], [150, 255]]])
    one_hot = one_hot_ade20k(labels)
    assert one_hot.shape == (1, 151, 2, 2)
    assert torch.equal(one_hot.sum(dim=1), torch.ones(1, 2, 2))
    assert one_hot[0, 0, 0, 0] == 1 and one_hot[0, 5, 0, 1] == 1
    assert one_hot[0, 150, 1, 0] == 1 and one_hot[0, 150, 1, 1] == 1  # 255 -> 150


def test_out_of_range_ids_are_rejected():
    with pytest.raises(ValueError, match="200"):
        one_hot_ade20k(torch.tensor([[[200]]]))


def test_palette_is_fixed_and_distinct():
    palette = ade20k_palette()
    assert palette.shape == (151, 3) and palette.dtype == torch.uint8
    assert palette[0].tolist() == [0, 0, 0]
    assert len({tuple(c) for c in palette.tolist()}) == 151
    assert torch.equal(palette, ade20k_palette())
    preview = colourise_ade20k(torch.tensor([[[3, 255]]]))
    assert torch.equal(torch.round((preview[0, :, 0, 0] + 1) * 127.5), palette[3].float())
    assert torch.equal(colourise_ade20k(one_hot_ade20k(torch.tensor([[[3, 255]]]))), preview)
