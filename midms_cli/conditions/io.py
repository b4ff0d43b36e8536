"""Reading and writing condition files for every condition kind.

Accepted inputs (`load_condition`):
  * any kind: `.npy` (uint8 -> /255, or float in [0, 1]) and `.safetensors` (tensor key "condition"),
    shaped (C, H, W) with exactly the kind's channel count ((H, W) is accepted for 1 channel);
  * canny: a grayscale edge PNG (pixels >= 128 are edges);
  * celebahq-edges: a part-label PNG (value k = CELEBAHQ_PARTS[k - 1], 0 = none), rendered with the
    official recipe; with no photo there is no Canny term, so channel 0 holds the part boundaries;
  * openpose: OpenPose keypoints, `.json` or `*_candidate.txt` (with its `*_subset.txt` beside it),
    rendered as the official loader does (a stick-figure picture alone is not enough: the limb
    distance maps need the keypoints);
  * ade20k: a label PNG whose pixel values are class ids (255 = unknown -> 150).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from midms_cli.atomic import atomic_path
from midms_cli.conditions import condition_spec
from midms_cli.errors import MidmsError
from midms_cli.images import check_pixel_count, open_lazily

TENSOR_KEY = "condition"  # the safetensors key of a condition tensor
POSE_FRAME = 256  # keypoints are in the pixel frame of 256 x 256 DeepFashion images (official keypoint files)

# Channels resized with nearest neighbour (edges, pictures, one-hot); the others bilinearly.
_NEAREST_CHANNELS = {"canny": (0,), "celebahq-edges": (0, 14), "openpose": (0, 1, 2)}


def resize_condition(condition: torch.Tensor, kind: str, size: int) -> torch.Tensor:
    """(C, H, W) -> (C, size, size): edge/picture/one-hot channels nearest, distance maps bilinear."""
    if condition.shape[-2:] == (size, size):
        return condition
    batch = condition.unsqueeze(0).float()
    nearest = F.interpolate(batch, size=(size, size), mode="nearest")[0]
    if kind == "ade20k":
        return nearest
    bilinear = F.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False)[0]
    keep_nearest = torch.zeros(condition.shape[0], 1, 1, dtype=torch.bool)
    keep_nearest[list(_NEAREST_CHANNELS.get(kind, ()))] = True
    return torch.where(keep_nearest, nearest, bilinear)


def _check_channels(condition: torch.Tensor, path: Path, kind: str) -> torch.Tensor:
    expected = condition_spec(kind).channels
    if condition.dim() == 2 and expected == 1:
        condition = condition.unsqueeze(0)
    if condition.dim() != 3:
        raise MidmsError(
            f"{path}: condition has shape {tuple(condition.shape)}, a {kind!r} condition needs "
            f"(C, H, W) with C = {expected}"
        )
    if condition.shape[0] != expected:
        raise MidmsError(
            f"{path}: condition has {condition.shape[0]} channels, a {kind!r} condition needs {expected}"
        )
    return condition


def _tensor_to_unit(array: torch.Tensor, path: Path) -> torch.Tensor:
    if array.dtype == torch.uint8:
        return array.float() / 255.0
    if not array.is_floating_point():
        raise MidmsError(f"{path}: condition tensors must be uint8 or float, got {array.dtype}")
    if not bool(torch.isfinite(array).all()):
        # Caught here, not after a whole translation: NaN would reach the output image.
        raise MidmsError(f"{path}: the condition holds NaN or infinite values; conditions are in [0, 1]")
    return array.float()


def _check_size(path: Path, shape: tuple[int, ...]) -> None:
    """The image pixel limit for tensor files, from the shape alone (before the data is read)."""
    if len(shape) >= 2:
        check_pixel_count(path, int(shape[-2]), int(shape[-1]))


def _load_npy(path: Path) -> torch.Tensor:
    array = np.load(path, allow_pickle=False, mmap_mode="r")  # reads the header only
    _check_size(path, array.shape)
    return torch.from_numpy(np.array(array))


def _load_tensor(path: Path) -> torch.Tensor:
    from safetensors import SafetensorError, safe_open

    try:
        if path.suffix == ".npy":
            return _load_npy(path)
        with safe_open(str(path), framework="pt") as handle:
            names = list(handle.keys())
            if TENSOR_KEY not in names:
                raise MidmsError(f"{path}: no tensor named {TENSOR_KEY!r} (found {sorted(names)})")
            _check_size(path, tuple(handle.get_slice(TENSOR_KEY).get_shape()))
            return handle.get_tensor(TENSOR_KEY)
    except MidmsError:
        raise
    except (OSError, ValueError, EOFError, SafetensorError) as exc:
        raise MidmsError(f"cannot read condition {path}: {exc}") from exc


def _read_png(path: Path, mode: str | None) -> np.ndarray:
    from PIL import Image

    handle = open_lazily(path)  # the pixel limit, checked before decoding
    try:
        with handle, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return np.asarray(handle.convert(mode) if mode and handle.mode != mode else handle)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise MidmsError(f"cannot read condition image {path}: {exc}") from exc


def _label_png(path: Path) -> torch.Tensor:
    """Pixel values as integer ids; palette PNGs give their indices, RGB PNGs are rejected."""
    labels = _read_png(path, None)
    if labels.ndim != 2:
        raise MidmsError(f"{path}: a label PNG needs one channel (grayscale or palette), not {labels.shape}")
    return torch.from_numpy(labels.astype(np.int64))


def _load_openpose(path: Path) -> torch.Tensor:
    from midms_cli.conditions.pose import read_openpose_candidate_subset, read_openpose_json, render_pose

    if path.suffix == ".json":
        keypoints = read_openpose_json(path)
    elif path.name.endswith("_candidate.txt"):
        subset = path.with_name(path.name[: -len("_candidate.txt")] + "_subset.txt")
        if not subset.exists():
            raise MidmsError(f"{path}: the matching subset file {subset.name} is missing")
        keypoints = read_openpose_candidate_subset(path, subset)
    else:
        raise MidmsError(
            f"{path}: an 'openpose' condition needs keypoints (.json or *_candidate.txt with *_subset.txt) "
            "or a 20-channel .npy/.safetensors tensor; a stick-figure picture alone is not enough"
        )
    return render_pose(keypoints.unsqueeze(0), POSE_FRAME)[0]


def _load_image_condition(path: Path, kind: str, size: int | None) -> torch.Tensor:
    if kind == "canny":
        grey = torch.from_numpy(_read_png(path, "L").copy()).float()
        if size is not None:
            grey = F.interpolate(grey[None, None], size=(size, size), mode="nearest")[0, 0]
        return (grey >= 128).float().unsqueeze(0)
    labels = _label_png(path)
    if size is not None:  # label maps are resized before rendering, as the official loaders do
        labels = F.interpolate(labels[None, None].float(), size=(size, size), mode="nearest")[0, 0].long()
    if kind == "ade20k":
        from midms_cli.conditions.segmentation import one_hot_ade20k

        try:
            return one_hot_ade20k(labels.unsqueeze(0))[0]
        except ValueError as exc:
            raise MidmsError(f"{path}: {exc}") from exc
    from midms_cli.conditions.celebahq import CELEBAHQ_PARTS, part_masks_from_labels, render_celebahq

    if labels.max() > len(CELEBAHQ_PARTS):
        raise MidmsError(
            f"{path}: part-label values must be 0..{len(CELEBAHQ_PARTS)} (CELEBAHQ_PARTS order), "
            f"found {int(labels.max())}"
        )
    return render_celebahq(part_masks_from_labels(labels).unsqueeze(0))[0]


def load_condition(path: str | Path, kind: str, size: int | None = None) -> torch.Tensor:
    """Read a condition of kind `kind` from `path` -> (C, size, size) float in [0, 1] (module docstring)."""
    path = Path(path)
    spec = condition_spec(kind)
    if not path.is_file():
        raise MidmsError(f"condition file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".npy", ".safetensors"):
        condition = _tensor_to_unit(_load_tensor(path), path)
    elif kind == "openpose":
        condition = _load_openpose(path)
    elif suffix == ".png":
        condition = _load_image_condition(path, kind, size)
    else:
        raise MidmsError(
            f"{path}: unsupported condition file for {kind!r}; use .png, .npy or .safetensors"
            + (" (.json / *_candidate.txt keypoints for openpose)" if kind == "openpose" else "")
        )
    condition = _check_channels(condition, path, spec.kind)
    if size is not None:
        condition = resize_condition(condition, kind, size)
    return condition.clamp(0.0, 1.0).contiguous()


def save_condition(condition: torch.Tensor, path: str | Path) -> None:
    """Write a (C, H, W) condition in [0, 1] atomically.

    `.npy` (float32) and `.safetensors` (key "condition", float32) take any channel count; `.png`
    takes 1 channel (grayscale) or 3 channels (RGB preview), rounded to 8 bits.
    """
    path = Path(path)
    condition = condition.detach().float().cpu()
    if condition.dim() != 3:
        raise ValueError(f"save_condition expects (C, H, W), got {tuple(condition.shape)}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.save(handle, condition.numpy(), allow_pickle=False)
    elif suffix == ".safetensors":
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:
            save_file({TENSOR_KEY: condition.contiguous()}, str(tmp))
    elif suffix == ".png":
        if condition.shape[0] not in (1, 3):
            raise MidmsError(f"{path}: a PNG holds 1 or 3 channels, this condition has {condition.shape[0]}; "
                             "use .npy or .safetensors")  # fmt: skip
        from PIL import Image

        pixels = torch.round(condition.clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
        image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
    else:
        raise MidmsError(f"{path}: unsupported condition file type {suffix!r}; use .npy, .safetensors, .png")
