"""Image files in and out: any common format to a (3, H, W) float tensor in [-1, 1], and PNG out.

Every mode is reduced to 8-bit RGB by one documented rule (see `to_rgb_array`), the pixel count is
checked from the header before decoding (decompression bombs), and resizing follows the spec's
interpolation choices (3.1/3.2): bicubic for photos, bilinear for distance maps, nearest for
label and edge maps.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from midms_cli.atomic import atomic_path
from midms_cli.errors import MidmsError

# 64 megapixels (e.g. 8192 x 8192): far above any training resolution, far below a bomb.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
MAX_PIXELS_ENV = "MIDMS_MAX_IMAGE_PIXELS"

# Background colour that transparent pixels are composited over (white, as a browser shows them).
BACKGROUND = 255

PIL_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
RESIZE_MODES = ("bicubic", "bilinear", "nearest", "nearest-exact")

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def max_pixels() -> int:
    """The decompression-bomb limit: $MIDMS_MAX_IMAGE_PIXELS, else DEFAULT_MAX_PIXELS."""
    value = os.environ.get(MAX_PIXELS_ENV)
    if value is None:
        return DEFAULT_MAX_PIXELS
    try:
        limit = int(value)
    except ValueError:
        raise MidmsError(f"{MAX_PIXELS_ENV}={value!r} is not an integer pixel count") from None
    if limit < 1:
        raise MidmsError(f"{MAX_PIXELS_ENV} must be a positive pixel count, got {limit}")
    return limit


# --------------------------------------------------------------------------------------------
# Mode conversion


def _composite_over_background(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Straight (non-premultiplied) alpha over a white background, rounded to uint8."""
    a = alpha.astype(np.float32)[..., None] / 255.0
    out = colour.astype(np.float32) * a + BACKGROUND * (1.0 - a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any PIL mode as a (H, W, 3) uint8 RGB array, by these rules:

    * L, 1: gray replicated to three channels.
    * LA, RGBA, PA, P with transparency: alpha composited over white (straight alpha, rounded).
    * P without transparency: its palette colours.
    * I;16*: 16-bit values scaled to 8 bits by v / 257, rounded (65535 -> 255); I (how PIL opens
      some 16-bit PNG/TIFF files) is treated the same after clipping to [0, 65535].
    * F: values on PIL's 0..255 scale, clipped and rounded.
    * CMYK: naive conversion R = (255 - C)(255 - K) / 255 (no ICC profile), likewise G, B.
    * anything else (RGB, RGBX, YCbCr, ...): PIL's own conversion to RGB.
    """
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode == "PA":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode == "1":
        image = image.convert("L")
        mode = "L"
    if mode == "L":
        return _gray_to_rgb(np.asarray(image, dtype=np.uint8))
    if mode == "LA":
        array = np.asarray(image, dtype=np.uint8)
        return _composite_over_background(_gray_to_rgb(array[..., 0]), array[..., 1])
    if mode in ("RGBA", "RGBa", "La"):
        array = np.asarray(image.convert("RGBA"), dtype=np.uint8)
        return _composite_over_background(array[..., :3], array[..., 3])
    if mode in _SIXTEEN_BIT or mode == "I":
        values = np.clip(np.asarray(image).astype(np.float64), 0, 65535)
        return _gray_to_rgb(np.rint(values / 257.0).astype(np.uint8))
    if mode == "F":
        values = np.clip(np.asarray(image).astype(np.float64), 0, 255)
        return _gray_to_rgb(np.rint(values).astype(np.uint8))
    if mode == "CMYK":
        cmyk = np.asarray(image).astype(np.float32)
        ink = 255.0 - cmyk[..., 3:4]
        return np.clip(np.rint((255.0 - cmyk[..., :3]) * ink / 255.0), 0, 255).astype(np.uint8)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# Loading


def open_lazily(path: str | os.PathLike, limit: int | None = None) -> Image.Image:
    """Open without decoding and check the pixel count from the header; errors name the file.

    The caller decodes (load, convert, draft) and closes the image.
    """
    path = Path(path)
    limit = max_pixels() if limit is None else limit
    if not path.exists():
        raise MidmsError(f"image file not found: {path}")
    if path.is_dir():
        raise MidmsError(f"expected an image file, got a directory: {path}")
    try:
        with warnings.catch_warnings():
            # Our own limit below replaces PIL's warning; PIL's hard error is still mapped to ours.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError:
        raise MidmsError(f"image {path} is too large to load safely (above PIL's bomb limit)") from None
    except UnidentifiedImageError:
        raise MidmsError(f"{path} is not an image file (or its format is not supported)") from None
    except PermissionError:
        raise MidmsError(f"cannot read image {path}: permission denied") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise MidmsError(f"image {path} is corrupt or truncated ({exc})") from None
    width, height = image.size
    if width * height > limit:
        image.close()
        raise MidmsError(
            f"image {path} is too large to load safely ({width}x{height} = {width * height} pixels, "
            f"limit {limit}); raise {MAX_PIXELS_ENV} if it is genuine"
        )
    return image


def check_pixel_count(path: str | os.PathLike, height: int, width: int, limit: int | None = None) -> None:
    """The limit of `open_lazily` for arrays read from other formats (a condition .npy)."""
    limit = max_pixels() if limit is None else limit
    if height * width > limit:
        raise MidmsError(
            f"{path} is too large to load safely ({width}x{height} = {width * height} pixels, "
            f"limit {limit}); raise {MAX_PIXELS_ENV} if it is genuine"
        )


def open_image(path: str | os.PathLike, limit: int | None = None) -> Image.Image:
    """Open, check the pixel count from the header, decode, apply EXIF orientation; errors name the file."""
    image = open_lazily(path, limit)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            transposed = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise MidmsError(f"image {path} is corrupt or truncated ({exc})") from None
    return transposed if transposed is not None else image


def resize_pil(image: Image.Image, size: int | tuple[int, int], mode: str = "bicubic") -> Image.Image:
    """Load-time resize with PIL (antialiased, like the official torchvision-on-PIL pipeline); size (H, W)."""
    height, width = (size, size) if isinstance(size, int) else size
    if mode not in PIL_FILTERS:
        raise ValueError(f"unknown PIL resize mode {mode!r}; use one of {', '.join(PIL_FILTERS)}")
    if image.size == (width, height):
        return image
    return image.resize((width, height), PIL_FILTERS[mode])


def array_to_tensor(array: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1] (v / 127.5 - 1, exact inverse of `to_uint8`)."""
    return torch.from_numpy(np.array(array, dtype=np.uint8)).permute(2, 0, 1).float() / 127.5 - 1.0


def load_image(
    path: str | os.PathLike, size: int | tuple[int, int] | None = None, *, limit: int | None = None
) -> torch.Tensor:
    """Any common image file as a (3, H, W) float tensor in [-1, 1], optionally bicubic-resized."""
    image = open_image(path, limit)
    rgb = Image.fromarray(to_rgb_array(image))
    if size is not None:
        rgb = resize_pil(rgb, size, "bicubic")
    return array_to_tensor(np.asarray(rgb))


# --------------------------------------------------------------------------------------------
# Saving


def to_uint8(tensor: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 by round((x + 1) * 127.5), clamped; shape unchanged."""
    if not torch.isfinite(tensor).all():
        raise ValueError("image tensor contains NaN or infinite values")
    return ((tensor.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def save_png(tensor: torch.Tensor, path: str | os.PathLike) -> None:
    """Write a (3, H, W) or (1, H, W) tensor in [-1, 1] as an 8-bit PNG, atomically."""
    if tensor.dim() != 3 or tensor.shape[0] not in (1, 3):
        raise ValueError(f"save_png expects a (3, H, W) or (1, H, W) tensor, got shape {tuple(tensor.shape)}")
    pixels = to_uint8(tensor).cpu().permute(1, 2, 0).numpy()
    image = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


# --------------------------------------------------------------------------------------------
# Tensor resizing


def resize(tensor: torch.Tensor, size: int | tuple[int, int], mode: str) -> torch.Tensor:
    """Resize a (C, H, W) or (B, C, H, W) tensor to `size` (an int for square, or (H, W)).

    * "bicubic": photos, as the official loaders; antialiased when shrinking; may overshoot the input range.
    * "bilinear": distance maps, as the official loaders; antialiased when shrinking.
    * "nearest": label, one-hot and edge maps; torch's legacy rule (floor(i * in / out)), as the
      official model uses for c -> latent grid.
    * "nearest-exact": nearest with pixel centres aligned, PIL's NEAREST rule (load-time maps).
    Integer and bool tensors keep their dtype (only nearest modes are allowed for them).
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; use one of {', '.join(RESIZE_MODES)}")
    height, width = (size, size) if isinstance(size, int) else size
    batched = tensor.dim() == 4
    if not batched and tensor.dim() != 3:
        raise ValueError(f"resize expects (C, H, W) or (B, C, H, W), got shape {tuple(tensor.shape)}")
    x = tensor if batched else tensor.unsqueeze(0)
    if tuple(x.shape[-2:]) == (height, width):
        return tensor
    dtype = x.dtype
    if not dtype.is_floating_point:
        if mode not in ("nearest", "nearest-exact"):
            raise ValueError(f"{dtype} tensors (labels, masks) can only be resized with a nearest mode")
        x = x.float()  # exact for labels below 2**24
    if mode in ("nearest", "nearest-exact"):
        out = F.interpolate(x, size=(height, width), mode=mode)
    else:
        out = F.interpolate(x, size=(height, width), mode=mode, align_corners=False, antialias=True)
    out = out.to(dtype)
    return out if batched else out.squeeze(0)
