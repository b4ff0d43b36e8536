"""The inputs of `midms translate`: condition files, exemplar photos, pair lists, and their checks.

Every input is brought to the model's square working size the same way (`FITS`): center-cropped
by default, padded, or squashed. A condition file must hold the map itself (a binary edge map, a
label map); a photo given where a map is expected is refused with the hint to use --extract,
instead of being thresholded into a meaningless map.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from midms_cli.conditions.celebahq import CELEBAHQ_PARTS
from midms_cli.conditions.io import load_condition, resize_condition
from midms_cli.errors import MidmsError
from midms_cli.extractors import EXTRACTORS, get_extractor
from midms_cli.images import array_to_tensor, open_image, open_lazily, resize_pil, to_rgb_array
from midms_cli.models.midm import MIDM

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
CONDITION_SUFFIXES = (".png", ".npy", ".safetensors", ".json", ".txt")

# How a non-square input becomes square: the centred square cut out ("crop"), the whole input
# with borders added ("pad": photos repeat their edge pixels, so no edge appears at the border;
# condition maps get zeros, i.e. no edge / no label), or both sides resized apart ("squash").
FITS = ("crop", "pad", "squash")

# A condition PNG is not a binary edge map when more than this share of its pixels is mid-grey
# (between the two thresholds) or coloured: edge maps saved with anti-aliasing stay far below it,
# photos far above.
GREY_SHARE_LIMIT = 0.10
_DARK, _LIGHT = 32, 223
# Canny maps are sparse: a map with more edge than background is an inverted one (black on white).
EDGE_SHARE_LIMIT = 0.5

# Label maps: the highest class id and the other values that are allowed (ADE20K's 255 = unknown).
LABEL_RANGES = {"ade20k": (150, (255,)), "celebahq-edges": (len(CELEBAHQ_PARTS), ())}
_LABEL_MODES = ("L", "P", "I", "I;16", "1")

Notice = Callable[[str], None]


@dataclass(frozen=True)
class Pair:
    """One translation job: condition file, exemplar photo, optional exemplar condition, output."""

    condition: Path
    exemplar: Path
    output: Path
    exemplar_condition: Path | None = None


def _ignore(message: str) -> None:
    pass


# --------------------------------------------------------------------------------------------
# Square fits


def fit_box(height: int, width: int, fit: str) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the centred square crop ("crop"), or the (top, left, bottom,
    right) padding that makes the input square ("pad"); zeros for square inputs and for "squash"."""
    if fit not in FITS:
        raise MidmsError(f"--resize {fit!r}: choose one of {', '.join(FITS)}")
    if height == width or fit == "squash":
        return (0, 0, 0, 0)
    side = min(height, width) if fit == "crop" else max(height, width)
    top, left = abs(height - side) // 2, abs(width - side) // 2
    return (top, left, abs(height - side) - top, abs(width - side) - left)


def fit_array(array: np.ndarray, fit: str, fill: str) -> np.ndarray:
    """An (H, W, ...) array made square by `fit`; padding repeats the edge ("edge") or adds zeros."""
    height, width = array.shape[:2]
    top, left, bottom, right = fit_box(height, width, fit)
    if fit == "crop":
        return array[top : height - bottom, left : width - right]
    if fit == "pad":
        widths = [(top, bottom), (left, right)] + [(0, 0)] * (array.ndim - 2)
        return np.pad(array, widths, mode="edge" if fill == "edge" else "constant")
    return array


def fit_tensor(tensor: Tensor, fit: str) -> Tensor:
    """A (C, H, W) condition made square by `fit` (padding with zeros: no edge, no label)."""
    height, width = tensor.shape[-2:]
    top, left, bottom, right = fit_box(height, width, fit)
    if fit == "crop":
        return tensor[:, top : height - bottom, left : width - right]
    if fit == "pad":
        return torch.nn.functional.pad(tensor, (left, right, top, bottom))
    return tensor


def _fit_notice(path: Path, height: int, width: int, fit: str, notice: Notice) -> None:
    if height == width:
        return
    done = {
        "crop": f"center-cropped to {min(height, width)}x{min(height, width)}",
        "pad": f"padded to {max(height, width)}x{max(height, width)}",
        "squash": "squashed to a square",
    }[fit]
    others = "|".join(f for f in FITS if f != fit)
    notice(f"note: {path} is {width}x{height}, not square: {done} (--resize {others} to change)")


# --------------------------------------------------------------------------------------------
# Photos and condition files


def load_photo(path: Path, size: int, fit: str = "crop", notice: Notice = _ignore) -> Tensor:
    """A photo as (3, size, size) in [-1, 1]: made square by `fit`, then resized bicubically."""
    rgb = to_rgb_array(open_image(path))
    _fit_notice(path, rgb.shape[0], rgb.shape[1], fit, notice)
    square = Image.fromarray(np.ascontiguousarray(fit_array(rgb, fit, fill="edge")))
    return array_to_tensor(np.asarray(resize_pil(square, size, "bicubic")))


def _extract_hint(kind: str) -> str:
    if kind in EXTRACTORS:
        return f"if it is a photo, add --extract to compute its {kind!r} condition"
    return f"a {kind!r} condition cannot be computed from a photo; give the map itself"


def check_condition_image(path: Path, kind: str) -> None:
    """Refuse a condition PNG that is a photo rather than a map of the model's kind.

    canny: a binary edge map (white edges on black; grey or coloured pixels only along edges).
    Label kinds: one channel (grayscale or palette) of class ids. A few stray values are left to the
    loader's own check, which names them.
    """
    try:
        with open_lazily(path) as handle:  # the pixel limit is checked before anything is decoded
            mode = handle.mode
            rgb = to_rgb_array(handle) if kind == "canny" else None
            labels = np.asarray(handle) if kind in LABEL_RANGES and mode in _LABEL_MODES else None
    except OSError as exc:
        raise MidmsError(f"cannot read condition image {path}: {exc}") from exc
    if kind == "canny":
        grey = rgb.astype(np.int16)
        coloured = (grey.max(axis=2) - grey.min(axis=2)) > _DARK
        mid = (grey.mean(axis=2) > _DARK) & (grey.mean(axis=2) < _LIGHT)
        share = float((coloured | mid).mean())
        if share > GREY_SHARE_LIMIT:
            raise MidmsError(
                f"{path} is not a binary edge map ({share:.0%} of its pixels are grey or coloured); "
                f"{_extract_hint(kind)}; an edge map is white edges on black"
            )
        edges = float((grey.mean(axis=2) >= 128).mean())
        if edges > EDGE_SHARE_LIMIT:
            raise MidmsError(
                f"{path}: {edges:.0%} of its pixels are edges; an edge map is white edges on black "
                "(invert this one), or, if it is a photo, add --extract"
            )
    elif kind in LABEL_RANGES:
        if labels is None:
            raise MidmsError(
                f"{path} is a {mode} image, not a {kind!r} label map (one channel of class ids); "
                f"{_extract_hint(kind)}"
            )
        highest, allowed = LABEL_RANGES[kind]
        stray = (labels > highest) & ~np.isin(labels, allowed)
        if stray.mean() > GREY_SHARE_LIMIT:
            raise MidmsError(
                f"{path} is not a {kind!r} label map ({stray.mean():.0%} of its pixels are no class id "
                f"0..{highest}); {_extract_hint(kind)}"
            )


def load_condition_file(
    path: Path, kind: str, size: int, fit: str = "crop", notice: Notice = _ignore
) -> Tensor:
    """A condition file as (C, size, size) in [0, 1], made square by `fit`; photos are refused."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES and suffix != ".png":
        raise MidmsError(
            f"{path}: condition maps are read from .png, .npy or .safetensors ({suffix} compression "
            f"changes edge and label values); {_extract_hint(kind)}"
        )
    if suffix == ".png" and kind != "openpose":
        check_condition_image(path, kind)
        with open_lazily(path) as handle:
            width, height = handle.size
        _fit_notice(path, height, width, fit, notice)
        if width == height or fit == "squash":
            return load_condition(path, kind, size)
        # A non-square map is read at its own size, made square, then resized like any condition.
        return resize_condition(fit_tensor(load_condition(path, kind), fit), kind, size).clamp(0, 1)
    if suffix in (".npy", ".safetensors"):
        condition = load_condition(path, kind)
        height, width = condition.shape[-2:]
        _fit_notice(path, height, width, fit, notice)
        return resize_condition(fit_tensor(condition, fit), kind, size).clamp(0, 1).contiguous()
    return load_condition(path, kind, size)  # openpose keypoints: rendered on their square frame


def _model_condition_kind(model: MIDM) -> str:
    return model.config.condition


def read_condition(
    model: MIDM, path: Path, size: int, extract: bool, fit: str = "crop", notice: Notice = _ignore
) -> Tensor:
    """(C, size, size) condition in [0, 1]: read from a file, or extracted from a photo (`extract`)."""
    kind = _model_condition_kind(model)
    if extract:
        photo = load_photo(path, size, fit, notice)
        extractor = get_extractor(kind, model.device)  # canny, openpose, ade20k
        condition = extractor(photo.unsqueeze(0).to(model.device))[0].cpu()
    else:
        condition = load_condition_file(path, kind, size, fit, notice)
    expected = model.config.correspondence.cond_channels
    if condition.shape[0] != expected:
        raise MidmsError(
            f"{path}: the condition has {condition.shape[0]} channels but the model expects "
            f"{expected} ({kind!r}); give a {kind!r} condition"
        )
    return condition


def read_exemplar(
    model: MIDM,
    path: Path,
    size: int,
    condition_path: Path | None,
    fit: str = "crop",
    notice: Notice = _ignore,
) -> tuple[Tensor, Tensor]:
    """The exemplar photo (3, size, size) in [−1, 1] and its own condition.

    The model encodes the exemplar together with its condition, as in training. The exemplar's
    condition is read from `condition_path`, else computed from the photo with the model's
    extractor (only for kinds that a bare photo determines, e.g. canny).
    """
    image = load_photo(path, size, fit, notice)
    if condition_path is not None:
        return image, read_condition(model, condition_path, size, extract=False, fit=fit, notice=notice)
    kind = _model_condition_kind(model)
    if kind not in EXTRACTORS:
        raise MidmsError(
            f"the exemplar's own {kind!r} condition cannot be computed from the photo {path}; "
            "pass it with --ref-cond FILE"
        )
    extractor = get_extractor(kind, model.device)
    condition = extractor(image.unsqueeze(0).to(model.device))[0].cpu()
    return image, condition


def check_size(model: MIDM, size: int | None, notice: Notice = _ignore) -> int:
    """The working image size: the model's own unless --size asks otherwise (a multiple of the
    first stage's and UNet's downsampling); another size than the training one is warned about."""
    trained = model.config.image_size
    if size is None:
        return trained
    factor = model.config.autoencoder.downsample * 2 ** (len(model.config.unet.channel_mult) - 1)
    if size < factor or size % factor:
        raise MidmsError(f"--size {size}: must be a positive multiple of {factor} for this model")
    if size != trained:
        notice(
            f"warning: --size {size} differs from the model's training size {trained}: expect "
            f"weaker images, and about {(size / trained) ** 2:.3g}x the time of a {trained} px run"
        )
    return size


# --------------------------------------------------------------------------------------------
# Pair lists


def _files(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in suffixes}


def pairs_from_folders(conditions: Path, exemplars: Path, out_dir: Path) -> list[Pair]:
    """Each condition file paired with the exemplar photo of the same file stem; output STEM.png."""
    condition_files = _files(conditions, CONDITION_SUFFIXES + IMAGE_SUFFIXES)
    exemplar_files = _files(exemplars, IMAGE_SUFFIXES)
    pairs = [
        Pair(path, exemplar_files[stem], out_dir / f"{stem}.png")
        for stem, path in condition_files.items()
        if stem in exemplar_files
    ]
    if not pairs:
        raise MidmsError(
            f"no condition in {conditions} has an exemplar of the same name in {exemplars}; "
            "name them alike (cond/0001.png + refs/0001.jpg) or use --pairs FILE"
        )
    return pairs


def read_pairs_file(path: Path, out_dir: Path) -> list[Pair]:
    """A pairs list: one `CONDITION EXEMPLAR [EXEMPLAR_CONDITION]` per line (whitespace or commas),
    '#' comments; relative paths are relative to the list's folder. Output: OUT_DIR/<line>_<stem>.png."""
    if not path.exists():
        raise MidmsError(f"pairs file {path} does not exist")
    if path.is_dir():  # anything else is read: a file, a pipe, /dev/stdin
        raise MidmsError(f"--pairs {path} is a folder; give a pairs list file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise MidmsError(f"pairs file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise MidmsError(f"cannot read pairs file {path}: {exc.strerror}") from None
    # Relative paths are relative to the list's folder; for a stream (/dev/stdin), to this one.
    anchor = path.parent if path.is_file() else Path.cwd()
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].replace(",", " ").split()
        if not fields:
            continue
        if len(fields) not in (2, 3):
            raise MidmsError(
                f"{path}:{number}: expected 'CONDITION EXEMPLAR [EXEMPLAR_CONDITION]', got {line!r}"
            )
        files = [Path(f) if Path(f).is_absolute() else anchor / f for f in fields]
        output = out_dir / f"{len(pairs):05d}_{files[0].stem}.png"
        pairs.append(Pair(files[0], files[1], output, files[2] if len(files) == 3 else None))
    if not pairs:
        raise MidmsError(f"pairs file {path} lists no pairs")
    return pairs


def check_inputs_exist(pairs: Iterable[Pair]) -> None:
    """Fail before any work when a listed file is missing."""
    for pair in pairs:
        for role, file in (
            ("condition", pair.condition),
            ("exemplar", pair.exemplar),
            ("exemplar condition", pair.exemplar_condition),
        ):
            if file is not None and not file.is_file():
                raise MidmsError(f"{role} file {file} does not exist")


def check_pairs(model: MIDM, pairs: list[Pair], size: int, extract: bool, fit: str = "crop") -> None:
    """Read every input of a batch once before any work, so a bad file late in the list fails the
    command before the first output is written (a single pair is checked as it is read)."""
    check_inputs_exist(pairs)
    if len(pairs) < 2:
        return
    exemplars = set()
    for pair in pairs:
        read_condition(model, pair.condition, size, extract, fit)
        if (pair.exemplar, pair.exemplar_condition) not in exemplars:
            read_exemplar(model, pair.exemplar, size, pair.exemplar_condition, fit)
            exemplars.add((pair.exemplar, pair.exemplar_condition))
