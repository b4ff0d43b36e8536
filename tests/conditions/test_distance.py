"""The L1 distance transform against a brute-force minimum over |dx| + |dy|."""

import itertools

import torch

from midms_cli.conditions.distance import distance_map, l1_distance_transform, normalise_distance


def brute_force_l1(mask: torch.Tensor) -> torch.Tensor:
    """min over feature pixels of |dx| + |dy|, pixel by pixel (inf when there is none)."""
    height, width = mask.shape
    features = [(y, x) for y, x in itertools.product(range(height), range(width)) if mask[y, x]]
    out = torch.full((height, width), float("inf"))
    for y, x in itertools.product(range(height), range(width)):
        for fy, fx in features:
            out[y, x] = min(out[y, x], abs(y - fy) + abs(x - fx))
    return out


def test_matches_brute_force_on_random_masks():
    torch.manual_seed(0)
    masks = torch.rand(4, 1, 9, 13) < torch.tensor([0.02, 0.1, 0.3, 0.6]).view(4, 1, 1, 1)
    masks[0, 0, 4, 6] = True  # at least one feature pixel everywhere
    result = l1_distance_transform(masks)
    assert result.shape == masks.shape and result.dtype == torch.float32
    for b in range(4):
        assert torch.equal(result[b, 0], brute_force_l1(masks[b, 0]))


def test_single_pixel_gives_city_block_diamond():
    mask = torch.zeros(1, 5, 5, dtype=torch.bool)
    mask[0, 2, 2] = True
    ys, xs = torch.meshgrid(torch.arange(5), torch.arange(5), indexing="ij")
    assert torch.equal(l1_distance_transform(mask)[0], ((ys - 2).abs() + (xs - 2).abs()).float())


def test_empty_mask_is_infinite_and_normalises_to_one():
    empty = torch.zeros(2, 1, 4, 6, dtype=torch.bool)
    assert torch.isinf(l1_distance_transform(empty)).all()
    assert torch.equal(distance_map(empty), torch.ones(2, 1, 4, 6))


def test_normalisation_divides_by_three_truncates_and_clips():
    distance = torch.tensor([0.0, 2.0, 3.0, 7.0, 764.0, 765.0, 10_000.0])
    expected = torch.tensor([0, 0, 1, 2, 254, 255, 255]) / 255.0
    assert torch.equal(normalise_distance(distance), expected)
