"""SWD (PGGAN protocol): pyramid and descriptors against loop implementations, invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from midms_cli.metrics.swd import (
    DescriptorSet,
    binomial_kernel,
    descriptor_sets,
    extract_descriptors,
    laplacian_pyramid,
    mean_and_sd,
    normalise_descriptors,
    pyramid_down,
    pyramid_levels,
    pyramid_up,
    sample_patch_centres,
    sliced_wasserstein,
    sliced_wasserstein_distance,
    swd_from_sets,
    swd_over_seeds,
    swd_seeds,
)

KERNEL = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]) / 256.0


def _mirror(index: int, size: int) -> int:
    """scipy.ndimage 'mirror' / cv2 BORDER_REFLECT_101: ... 2 1 | 0 1 2 ... n-1 | n-2 ..."""
    if index < 0:
        return -index
    if index >= size:
        return 2 * (size - 1) - index
    return index


def _convolve_mirror(plane: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    height, width = plane.shape
    out = np.zeros_like(plane)
    for y in range(height):
        for x in range(width):
            total = 0.0
            for dy in range(-2, 3):
                for dx in range(-2, 3):
                    total += kernel[dy + 2, dx + 2] * plane[_mirror(y + dy, height), _mirror(x + dx, width)]
            out[y, x] = total
    return out


def _loop_pyr_down(plane):
    return _convolve_mirror(plane, KERNEL)[::2, ::2]


def _loop_pyr_up(plane):
    up = np.zeros((plane.shape[0] * 2, plane.shape[1] * 2))
    up[::2, ::2] = plane
    return _convolve_mirror(up, 4 * KERNEL)


def test_kernel_is_normalised_binomial():
    assert torch.allclose(binomial_kernel().double(), torch.from_numpy(KERNEL))
    assert float(binomial_kernel().sum()) == pytest.approx(1.0)


def test_pyramid_matches_loop_implementation():
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, size=(1, 1, 8, 8))
    down = pyramid_down(torch.from_numpy(image).float())[0, 0].double().numpy()
    np.testing.assert_allclose(down, _loop_pyr_down(image[0, 0]), atol=1e-3)
    up = pyramid_up(torch.from_numpy(down[None, None]).float())[0, 0].double().numpy()
    np.testing.assert_allclose(up, _loop_pyr_up(down), atol=1e-3)
    levels = laplacian_pyramid(torch.from_numpy(image).float(), 2)
    np.testing.assert_allclose(
        levels[0][0, 0].numpy(), image[0, 0] - _loop_pyr_up(_loop_pyr_down(image[0, 0])), atol=1e-3
    )
    np.testing.assert_allclose(levels[1][0, 0].numpy(), _loop_pyr_down(image[0, 0]), atol=1e-3)


def test_pyramid_of_a_constant_image_is_band_free():
    levels = laplacian_pyramid(torch.full((1, 3, 32, 32), 100.0), 3)
    assert [tuple(level.shape[-2:]) for level in levels] == [(32, 32), (16, 16), (8, 8)]
    assert levels[0].abs().max() < 1e-3 and levels[1].abs().max() < 1e-3
    assert torch.allclose(levels[2], torch.full_like(levels[2], 100.0))


def test_levels_go_down_to_16_pixels():
    assert pyramid_levels(256) == [256, 128, 64, 32, 16]
    assert pyramid_levels(64) == [64, 32, 16]


def test_descriptors_match_flat_index_gather():
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 255, size=(2, 3, 12, 10)).astype(np.float32)
    centres = sample_patch_centres(2, 12, 10, 5, torch.Generator().manual_seed(0))
    assert centres[:, 1].min() >= 3 and centres[:, 1].max() <= 12 - 4
    assert centres[:, 2].min() >= 3 and centres[:, 2].max() <= 10 - 4
    assert centres[:, 0].tolist() == [0] * 5 + [1] * 5
    actual = extract_descriptors(torch.from_numpy(images), centres).numpy()
    flat = images.reshape(-1)
    for n, (image, cy, cx) in enumerate(centres.tolist()):
        for c in range(3):
            for i, dy in enumerate(range(-3, 4)):
                for j, dx in enumerate(range(-3, 4)):
                    index = ((image * 3 + c) * 12 + cy + dy) * 10 + cx + dx
                    assert actual[n, c, i, j] == flat[index]


def test_normalisation_is_per_colour_channel():
    torch.manual_seed(0)
    descriptors = torch.randn(50, 3, 7, 7) * torch.tensor([1.0, 5.0, 0.1]).view(1, 3, 1, 1) + 7
    flat = normalise_descriptors(descriptors).view(50, 3, 7, 7)
    assert torch.allclose(flat.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(flat.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-5)


def test_sliced_wasserstein_of_shifted_one_dimensional_sets_is_the_shift():
    # In 1-D every unit direction is +-1, so the sorted projection difference is exactly the shift.
    a = torch.randn(100, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    value = sliced_wasserstein(
        a, a + 0.25, torch.Generator().manual_seed(1), repeats=2, directions_per_repeat=3
    )
    assert value == pytest.approx(0.25, abs=1e-9)


def _structured_images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random colour fields plus pixel noise, on the 8-bit grid (float)."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.rand(count, 3, size // 8, size // 8, generator=generator) * 255
    smooth = torch.nn.functional.interpolate(low, scale_factor=8, mode="bicubic", align_corners=False)
    return (smooth + 20 * torch.randn(smooth.shape, generator=generator)).round().clamp(0, 255)


def _gaussian_blur(images: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    taps = torch.exp(-0.5 * (torch.arange(-4, 5, dtype=torch.float32) / sigma) ** 2)
    taps = (taps / taps.sum()).view(1, 1, 1, 9).expand(3, 1, 1, 9)
    padded = torch.nn.functional.pad(images, (4, 4, 0, 0), mode="reflect")
    rows = torch.nn.functional.conv2d(padded, taps, groups=3)
    padded = torch.nn.functional.pad(rows, (0, 0, 4, 4), mode="reflect")
    return torch.nn.functional.conv2d(padded, taps.transpose(2, 3), groups=3).round().clamp(0, 255)


def test_identical_descriptors_give_zero_and_the_sets_of_one_comparison_are_cut_independently():
    a = torch.randn(64, 147, generator=torch.Generator().manual_seed(0))
    assert sliced_wasserstein(a, a.clone(), torch.Generator().manual_seed(1)) == 0.0
    real, fake = descriptor_sets(32, seed=5)
    assert real.seed != fake.seed and swd_seeds(5) != swd_seeds(6)
    images = _structured_images(4, 32)
    real.add(images)
    fake.add(images.clone())
    assert not torch.equal(real.finalised()[0], fake.finalised()[0])
    # The same images in both sets still differ by the sampling of positions (as in PGGAN).
    assert sliced_wasserstein_distance(images, images.clone(), seed=3)["swd"] > 1.0
    with pytest.raises(ValueError, match="same positions"):
        swd_from_sets(DescriptorSet(32, seed=1), DescriptorSet(32, seed=1))


def test_a_colour_shift_scores_clearly_above_zero_and_blur_above_shift_at_the_finest_level():
    images = _structured_images(16, 64)
    shift = (images + torch.tensor([30.0, 0.0, -20.0]).view(1, 3, 1, 1)).clamp(0, 255)
    shifted = sliced_wasserstein_distance(images, shift, seed=0)
    blurred = sliced_wasserstein_distance(images, _gaussian_blur(images), seed=0)
    assert set(shifted) == {"swd_64", "swd_32", "swd_16", "swd"}
    # Cut at identical positions, per-set normalisation made a pure shift score exactly 0.
    assert all(value > 10.0 for value in shifted.values())
    assert blurred["swd_64"] > 2 * shifted["swd_64"]
    assert blurred["swd"] > shifted["swd"]


def test_more_blur_gives_larger_swd():
    torch.manual_seed(0)
    images = torch.rand(4, 3, 32, 32) * 255
    values, blurred = [], images
    for _ in range(3):
        blurred = torch.nn.functional.avg_pool2d(blurred, 3, stride=1, padding=1, count_include_pad=False)
        values.append(sliced_wasserstein_distance(images, blurred, seed=0)["swd_32"])
    assert values[0] > 0 and values == sorted(values) and values[0] < values[-1]


def test_results_are_seeded_and_batching_does_not_matter_for_sizes():
    torch.manual_seed(0)
    real, fake = torch.rand(4, 3, 32, 32) * 255, torch.rand(4, 3, 32, 32) * 255
    assert sliced_wasserstein_distance(real, fake, seed=1) == sliced_wasserstein_distance(real, fake, seed=1)
    assert sliced_wasserstein_distance(real, fake, seed=1) != sliced_wasserstein_distance(real, fake, seed=2)
    streamed = DescriptorSet(32, seed=1)
    streamed.add(real[:2])
    streamed.add(real[2:])
    assert streamed.count == 4 and streamed.finalised()[0].shape == (4 * 128, 147)


def test_mean_and_sd_over_seeds():
    summary = mean_and_sd(
        [{"swd": 1.0, "swd_16": 4.0}, {"swd": 3.0, "swd_16": 4.0}, {"swd": 8.0, "swd_16": 4.0}]
    )
    assert summary["swd"] == pytest.approx(4.0) and summary["swd_16"] == pytest.approx(4.0)
    assert summary["swd_sd"] == pytest.approx(((9 + 1 + 16) / 2) ** 0.5) and summary["swd_16_sd"] == 0.0
    torch.manual_seed(0)
    real, fake = torch.rand(4, 3, 16, 16) * 255, torch.rand(4, 3, 16, 16) * 255
    over = swd_over_seeds(real, fake, [0, 1, 2])
    single = [sliced_wasserstein_distance(real, fake, seed)["swd"] for seed in (0, 1, 2)]
    assert over["swd"] == pytest.approx(sum(single) / 3) and over["swd_sd"] > 0


def test_images_below_the_last_pyramid_level_are_a_user_error():
    from midms_cli.errors import MidmsError

    with pytest.raises(MidmsError, match="at least 16 px, got 8; .*leave swd out of --metrics"):
        DescriptorSet(8)
