"""Style relevance and semantic consistency (CoCosNet protocol) on hand-made features."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from midms_cli.metrics.style import (
    StyleAccumulator,
    region_mean_features,
    semantic_consistency,
    style_relevance,
)


def test_region_mean_is_masked_channel_mean():
    features = torch.arange(2 * 2 * 2, dtype=torch.float32).view(1, 2, 2, 2)  # channels [0..3], [4..7]
    masks = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    masks[0, 0, 0] = True  # top row
    masks[0, 1, :, 1] = True  # right column
    means = region_mean_features(features, masks)
    assert torch.allclose(means, torch.tensor([[[0.5, 4.5], [2.0, 6.0]]]))


def test_style_relevance_compares_corresponding_regions():
    # Output: region 0 red-ish, region 1 green-ish; the exemplar: same colours, regions swapped in space.
    out = torch.zeros(1, 2, 4, 4)
    out[0, 0, :2], out[0, 1, 2:] = 1.0, 1.0
    exemplar = torch.zeros(1, 2, 4, 4)
    exemplar[0, 1, :2], exemplar[0, 0, 2:] = 1.0, 1.0
    out_masks = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    out_masks[0, 0, :2], out_masks[0, 1, 2:] = True, True
    ex_masks = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    ex_masks[0, 0, 2:], ex_masks[0, 1, :2] = True, True
    assert float(style_relevance(out, exemplar, out_masks, ex_masks)[0]) == pytest.approx(1.0)
    # Without regions both images average to the same mean colour as well.
    assert float(style_relevance(out, exemplar)[0]) == pytest.approx(1.0)
    # Regions matched wrongly (the exemplar's masks swapped): orthogonal colours.
    assert float(style_relevance(out, exemplar, out_masks, ex_masks.flip(1))[0]) == pytest.approx(
        0.0, abs=1e-6
    )


def test_absent_regions_are_skipped():
    out = torch.rand(1, 3, 4, 4) + 0.1
    masks = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    masks[0, 0] = True  # region 1 is absent
    value = style_relevance(out, out * 2, masks, masks)
    assert float(value[0]) == pytest.approx(1.0)
    assert torch.isnan(style_relevance(out, out, masks[:, 1:], masks[:, 1:]))[0]


def test_semantic_consistency_is_layer_mean_of_map_cosines():
    torch.manual_seed(0)
    a = {layer: torch.rand(2, 4, 3, 3) for layer in ("r32", "r42", "r52")}
    b = {layer: torch.rand(2, 4, 3, 3) for layer in ("r32", "r42", "r52")}
    expected = sum(F.cosine_similarity(a[k].flatten(1), b[k].flatten(1)) for k in a) / 3
    assert torch.allclose(semantic_consistency(a, b), expected)
    assert torch.allclose(semantic_consistency(a, a), torch.ones(2))


class _FakeVGG(torch.nn.Module):
    """Stands in for models.vgg.VGG19Features: named maps that are simple functions of the image."""

    def forward(self, image, layers):
        x = (image + 1) / 2
        return {
            layer: F.avg_pool2d(x, 2**i)
            for i, layer in enumerate(("r12", "r22", "r32", "r42", "r52"))
            if layer in layers
        }


def test_accumulator_scores_identical_images_as_one():
    torch.manual_seed(0)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    accumulator = StyleAccumulator(_FakeVGG())
    accumulator.add(images, images.clone(), source=images.clone())
    result = accumulator.result()
    assert set(result) == {"style_colour", "style_texture", "semantic_consistency"}
    assert all(value == pytest.approx(1.0, abs=1e-6) for value in result.values())
