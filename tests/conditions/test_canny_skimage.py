"""The scikit-image Canny port against scikit-image itself (a test-only dependency)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import feature

from midms_cli.conditions.canny import canny_edges, pil_grey, skimage_canny
from midms_cli.conditions.celebahq import inner_label, part_boundaries, render_celebahq


def smooth_noise(seed: int, height: int, width: int, noise: float) -> np.ndarray:
    """uint8 picture: a bicubic-upsampled random field plus Gaussian pixel noise."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 1, max(height // 8, 2), max(width // 8, 2), generator=generator) * 255
    field = F.interpolate(low, size=(height, width), mode="bicubic", align_corners=False)[0, 0]
    field = field + noise * torch.randn(field.shape, generator=generator)
    return field.round().clamp(0, 255).to(torch.uint8).numpy()


def shapes(height: int, width: int) -> np.ndarray:
    """Flat regions with straight and diagonal steps: exact ties everywhere along the edges."""
    picture = np.zeros((height, width), np.uint8)
    picture[height // 4 : 3 * height // 4, width // 3 :] = 200
    picture[:, : width // 5] = 90
    rows, cols = np.mgrid[:height, :width]
    picture[(rows - cols) > height // 2] = 30
    return picture


@pytest.mark.parametrize(
    "picture",
    [
        smooth_noise(0, 32, 32, 0.0),
        smooth_noise(1, 64, 64, 5.0),
        smooth_noise(2, 48, 40, 20.0),
        smooth_noise(3, 96, 96, 12.0),
        shapes(32, 32),
        shapes(40, 56),
        np.full((24, 24), 128, np.uint8),
        (np.arange(24 * 24).reshape(24, 24) % 7 * 3).astype(np.uint8),  # weak texture near threshold
    ],
)
def test_the_port_equals_skimage_feature_canny(picture):
    expected = feature.canny(picture)
    ours = skimage_canny(torch.from_numpy(picture)[None])[0].numpy()
    assert ours.dtype == bool and ours.shape == picture.shape
    assert np.array_equal(ours, expected), f"{int((ours != expected).sum())} of {int(expected.sum())} differ"


def test_a_batch_is_each_picture_on_its_own():
    pictures = np.stack([smooth_noise(4, 32, 32, 8.0), shapes(32, 32)])
    batch = skimage_canny(torch.from_numpy(pictures))
    for picture, edges in zip(pictures, batch, strict=True):
        assert np.array_equal(edges.numpy(), feature.canny(picture))
    with pytest.raises(ValueError, match="uint8"):
        skimage_canny(torch.zeros(1, 8, 8))


def test_grey_is_pils_convert_l():
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    image = torch.from_numpy(rgb).permute(2, 0, 1).float()[None] / 127.5 - 1.0
    expected = np.asarray(Image.fromarray(rgb).convert("L"))
    assert np.array_equal(pil_grey(image)[0].numpy(), expected)


def test_celebahq_edge_channel_is_the_official_composition():
    size = 48
    masks = torch.zeros(1, 13, size, size, dtype=torch.bool)
    masks[0, 0, 10:40, 12:36] = True  # skin
    masks[0, 3, 18:22, 16:22] = True  # l_eye
    masks[0, 12, 0:14, 6:42] = True  # hair
    photo = np.stack([smooth_noise(k, size, size, 10.0) for k in range(3)], axis=-1)
    image = torch.from_numpy(photo).permute(2, 0, 1).float()[None] / 127.5 - 1.0
    cond = render_celebahq(masks, image)
    grey = np.asarray(Image.fromarray(photo).convert("L"))
    canny = feature.canny(grey) & inner_label(masks)[0, 0].numpy()
    boundaries = part_boundaries(masks[0]).any(0).numpy()
    assert np.array_equal(cond[0, 0].numpy() > 0.5, boundaries | canny)
    assert canny.sum() > 20  # the photo's own edges really reach channel 0
    # The plain detector (kornia) is a different one: it is not what channel 0 uses.
    assert not np.array_equal(canny_edges(image)[0, 0].numpy() > 0.5, feature.canny(grey))
