"""Canny edge maps with kornia, tuned to scikit-image's defaults used by the official recipe.

The official CelebA-HQ loader calls `skimage.feature.canny(gray)` with default parameters: Gaussian sigma 1.0
(truncated at 4 sigma, a 9-tap kernel), unnormalised Sobel gradients (scipy.ndimage.sobel), and
hysteresis thresholds 0.1 / 0.2 on the gradient magnitude of a [0, 1] image. kornia's `canny`
uses the same unnormalised Sobel operator, so the same numbers apply; we pass a 9x9 kernel to match
the 4-sigma truncation, and clear the one-pixel image border that scikit-image never marks (it
erodes its mask by one pixel). Remaining differences: kornia reflects at the border where
scikit-image pads with zeros and renormalises, and its non-maximum suppression breaks ties OpenCV's
way, so a few pixels near the border and on exactly tied gradients can differ.
"""

from __future__ import annotations

import kornia
import torch

CANNY_SIGMA = 1.0  # skimage default
CANNY_LOW = 0.1  # skimage default: 10 % of the [0, 1] range
CANNY_HIGH = 0.2  # skimage default: 20 % of the [0, 1] range
CANNY_KERNEL = 9  # 2 * ceil(4 * sigma) + 1: scipy's gaussian_filter truncates at 4 sigma


def grayscale(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 1, H, W) in [0, 1] with ITU-R 601 luma weights (PIL's "L")."""
    return kornia.color.rgb_to_grayscale(((image + 1.0) / 2.0).clamp(0.0, 1.0))


def canny_edges(image: torch.Tensor) -> torch.Tensor:
    """Canny edges of a batch of RGB images in [-1, 1] -> (B, 1, H, W) float in {0, 1}.

    Also accepts a single-channel image (B, 1, H, W) in [-1, 1].
    """
    if image.dim() != 4 or image.shape[1] not in (1, 3):
        raise ValueError(f"canny_edges expects (B, 1|3, H, W), got {tuple(image.shape)}")
    image = image.float()
    if image.shape[1] == 3:
        gray = grayscale(image)
    else:
        gray = ((image + 1.0) / 2.0).clamp(0.0, 1.0)
    _, edges = kornia.filters.canny(
        gray,
        low_threshold=CANNY_LOW,
        high_threshold=CANNY_HIGH,
        kernel_size=(CANNY_KERNEL, CANNY_KERNEL),
        sigma=(CANNY_SIGMA, CANNY_SIGMA),
    )
    edges = edges > 0.5
    # scikit-image erodes its (all-ones) mask by one pixel, so it never marks the outermost ring.
    edges[..., :1, :] = False
    edges[..., -1:, :] = False
    edges[..., :, :1] = False
    edges[..., :, -1:] = False
    return edges.float()
