"""Canny edge maps: a fast kornia detector, and an exact port of scikit-image's `feature.canny`.

`canny_edges` (kornia) serves the plain `canny` condition, `translate --extract` and the generated
datasets: it follows scikit-image's defaults (Gaussian sigma 1.0 truncated at 4 sigma, a 9-tap
kernel, unnormalised Sobel gradients, hysteresis 0.1 / 0.2 on a [0, 1] image, the one-pixel
border never marked), but reflects at the border where scikit-image pads with zeros and
renormalises, and breaks non-maximum-suppression ties its own way, so a few percent of its edge
pixels differ from scikit-image's.

`skimage_canny` reproduces `skimage.feature.canny(grey)` with its defaults step by step, in
float64, for the CelebA-HQ edge channel, where the official loader (CoCosNet's, reused by MIDMs)
calls scikit-image on PIL's 8-bit grey picture:
1. Gaussian smoothing (scipy.ndimage.gaussian_filter, radius 4, zero padding), divided by the same
   smoothing of an all-ones mask (+ float64 eps), which undoes the zero padding's darkening;
2. Sobel gradients along rows and columns (scipy.ndimage.sobel, 'reflect' border), magnitude;
3. non-maximum suppression with bilinear interpolation between the two neighbours along the
   gradient, in four sectors, on the image minus its one-pixel border, keeping magnitudes at or
   above the low threshold (a C float, so float32(0.1));
4. hysteresis: keep the 8-connected groups of surviving pixels that hold a magnitude >= 0.2.
The float64 operations are scikit-image's and scipy's in their order (including img_as_float's
multiplication by 1/255), so even exact ties, common along the straight edges of flat regions,
come out as scikit-image decides them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

CANNY_SIGMA = 1.0  # skimage default
CANNY_LOW = 0.1  # skimage default: 10 % of the [0, 1] range
CANNY_HIGH = 0.2  # skimage default: 20 % of the [0, 1] range
CANNY_KERNEL = 9  # 2 * ceil(4 * sigma) + 1: scipy's gaussian_filter truncates at 4 sigma
# scikit-image's suppression takes the low threshold as a C float.
SKIMAGE_LOW = float(np.float32(CANNY_LOW))


def grayscale(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 1, H, W) in [0, 1] with ITU-R 601 luma weights (PIL's "L")."""
    import kornia  # here, not at the top: 20 MB resident that a translation without --extract never uses

    return kornia.color.rgb_to_grayscale(((image + 1.0) / 2.0).clamp(0.0, 1.0))


def canny_edges(image: torch.Tensor) -> torch.Tensor:
    """Canny edges (kornia) of a batch of RGB images in [-1, 1] -> (B, 1, H, W) float in {0, 1}.

    Also accepts a single-channel image (B, 1, H, W) in [-1, 1].
    """
    if image.dim() != 4 or image.shape[1] not in (1, 3):
        raise ValueError(f"canny_edges expects (B, 1|3, H, W), got {tuple(image.shape)}")
    import kornia

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


# --- the scikit-image port --------------------------------------------------------------------


def pil_grey(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [-1, 1] on the 8-bit grid -> (B, H, W) uint8 as PIL's convert("L"):
    (19595 R + 38470 G + 7471 B + 2^15) >> 16 in integers."""
    rgb = torch.round((image.double() + 1.0) * 127.5).clamp(0, 255).long()
    weights = torch.tensor([19595, 38470, 7471], device=image.device).view(1, 3, 1, 1)
    return (((rgb * weights).sum(1) + 32768) >> 16).to(torch.uint8)


def _correlate1d(x: torch.Tensor, taps: np.ndarray, dim: int, mode: str) -> torch.Tensor:
    """scipy.ndimage.correlate1d of x along `dim` for a symmetric or antisymmetric odd filter.

    Summed in scipy's order so that float64 results agree to the last bit: the centre tap first,
    then the pairs from the outermost inwards, each pair added (symmetric) or subtracted
    (antisymmetric) before it is weighted. Borders: 'constant' (zeros) or 'reflect' (for a 3-tap
    filter the mirrored pixel is the edge pixel itself).
    """
    radius = (len(taps) - 1) // 2
    if mode == "reflect" and radius != 1:
        raise ValueError("the 'reflect' border is implemented for 3-tap filters only")
    antisymmetric = bool(np.all(taps[:radius] == -taps[::-1][:radius])) and taps[radius] == 0
    size = x.shape[dim]
    moved = x.movedim(dim, -1)
    if mode == "constant":
        padded = F.pad(moved, (radius, radius))
    else:
        padded = torch.cat([moved[..., :1], moved, moved[..., -1:]], dim=-1)

    def at(offset: int) -> torch.Tensor:
        return padded[..., radius + offset : radius + offset + size]

    out = at(0) * float(taps[radius])
    for j in range(radius, 0, -1):  # scipy's jj = -radius .. -1, weight taps[radius - j]
        pair = at(-j) - at(j) if antisymmetric else at(-j) + at(j)
        out = out + pair * float(taps[radius - j])
    return out.movedim(-1, dim)


def gaussian_taps(sigma: float = CANNY_SIGMA, truncate: float = 4.0) -> np.ndarray:
    """scipy's 1-D Gaussian (computed with numpy as scipy does): radius int(truncate * sigma + 0.5),
    exp(-0.5 / sigma^2 * x^2), divided by its sum."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (sigma * sigma) * x**2)
    return phi / phi.sum()


def smoothed(grey: torch.Tensor, sigma: float = CANNY_SIGMA) -> torch.Tensor:
    """Step 1: zero-padded Gaussian of (B, H, W) float64 divided by that of an all-ones mask (+ eps)."""
    taps = gaussian_taps(sigma)[::-1]  # scipy correlates with the reversed kernel (symmetric anyway)

    def gaussian(x: torch.Tensor) -> torch.Tensor:
        return _correlate1d(_correlate1d(x, taps, 1, "constant"), taps, 2, "constant")

    bleed_over = gaussian(torch.ones_like(grey)) + np.finfo(np.float64).eps
    return gaussian(grey) / bleed_over


def sobel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2: (gradient along rows "isobel", along columns "jsobel"), scipy's unnormalised Sobel:
    [-1, 0, 1] along the axis, then [1, 2, 1] across it."""
    derivative, smoothing = np.array([-1.0, 0.0, 1.0]), np.array([1.0, 2.0, 1.0])
    isobel = _correlate1d(_correlate1d(x, derivative, 1, "reflect"), smoothing, 2, "reflect")
    jsobel = _correlate1d(_correlate1d(x, derivative, 2, "reflect"), smoothing, 1, "reflect")
    return isobel, jsobel


def _shifted(m: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """m[x + dx, y + dy] at every interior pixel (border pixels get 0; they are masked anyway)."""
    padded = F.pad(m, (1, 1, 1, 1))
    rows, cols = m.shape[-2:]
    return padded[..., 1 + dx : 1 + dx + rows, 1 + dy : 1 + dy + cols]


def non_maximum_suppression(
    isobel: torch.Tensor, jsobel: torch.Tensor, magnitude: torch.Tensor
) -> torch.Tensor:
    """Step 3: the magnitude where it is a local maximum along the gradient, else 0.

    Sector by the gradient's signs (cond1: both positive or both non-positive) and by which of
    |isobel|, |jsobel| is larger; the neighbour on each side is interpolated as
    w * diagonal + (1 - w) * axial with w = smaller / larger component; ties keep the pixel.
    """
    down, left = isobel <= 0, jsobel <= 0
    cond1 = (~down & ~left) | (down & left)
    abs_i, abs_j = isobel.abs(), jsobel.abs()
    m = magnitude

    def neighbours(a, b, c, d):
        return tuple(_shifted(m, *offset) for offset in (a, b, c, d))

    # (neigh1_1, neigh1_2, neigh2_1, neigh2_2) per sector, as scikit-image's Cython loop picks them.
    rows_major = neighbours((1, 0), (1, 1), (-1, 0), (-1, -1))
    cols_major = neighbours((0, 1), (1, 1), (0, -1), (-1, -1))
    anti_cols = neighbours((0, 1), (-1, 1), (0, -1), (1, -1))
    anti_rows = neighbours((-1, 0), (-1, 1), (1, 0), (1, -1))
    sector_a = cond1 & (abs_i > abs_j)
    sector_b = cond1 & ~(abs_i > abs_j)
    sector_c = ~cond1 & (abs_i < abs_j)
    w = torch.where(sector_a | ~(cond1 | sector_c), abs_j / abs_i, abs_i / abs_j)
    chosen = [
        torch.where(sector_a, ra, torch.where(sector_b, cb, torch.where(sector_c, ac, ar)))
        for ra, cb, ac, ar in zip(rows_major, cols_major, anti_cols, anti_rows, strict=True)
    ]
    n11, n12, n21, n22 = chosen
    c_plus = (n12 * w + n11 * (1.0 - w)) <= m
    c_minus = (n22 * w + n21 * (1.0 - w)) <= m
    interior = torch.zeros_like(m, dtype=torch.bool)
    interior[..., 1:-1, 1:-1] = True
    keep = interior & (m >= SKIMAGE_LOW) & c_plus & c_minus
    return torch.where(keep, m, torch.zeros_like(m))


def hysteresis(suppressed: torch.Tensor, high: float = CANNY_HIGH) -> torch.Tensor:
    """Step 4: the 8-connected groups of nonzero pixels that contain a value >= high."""
    candidates = suppressed > 0
    kept = candidates & (suppressed >= high)
    while True:
        grown = (F.max_pool2d(kept.unsqueeze(1).float(), 3, stride=1, padding=1).squeeze(1) > 0) & candidates
        if torch.equal(grown, kept):
            return kept
        kept = grown


def skimage_canny(grey: torch.Tensor) -> torch.Tensor:
    """`skimage.feature.canny` with its defaults on (B, H, W) uint8 grey pictures -> (B, H, W) bool."""
    if grey.dim() != 3 or grey.dtype != torch.uint8:
        raise ValueError(f"skimage_canny expects (B, H, W) uint8, got {tuple(grey.shape)} {grey.dtype}")
    image = grey.double() * (1.0 / 255.0)  # img_as_float multiplies by the reciprocal
    isobel, jsobel = sobel(smoothed(image))
    magnitude = torch.sqrt(isobel * isobel + jsobel * jsobel)
    return hysteresis(non_maximum_suppression(isobel, jsobel, magnitude))
