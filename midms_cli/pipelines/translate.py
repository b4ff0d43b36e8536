"""Translate conditions into images in the style of exemplars with a trained MIDMs model file.

Model files are safetensors of kind "midms" holding `first_stage.`, `unet.` and `correspondence.`
with the ModelConfig JSON in the metadata (key "config"), so the file alone rebuilds the model.
Every input is read and checked before any output is written; outputs are PNGs written atomically.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import midms_cli
from midms_cli.checkpoint import RunDir, load_modules, read_metadata, save_modules
from midms_cli.conditions.io import load_condition
from midms_cli.config import (
    ModelConfig,
    SamplingConfig,
    UNetConfig,
    apply_sampling_variant,
    rewarp_positions_within,
    to_dict,
    validate,
)
from midms_cli.errors import ConfigError, MidmsError
from midms_cli.extractors import EXTRACTORS, get_extractor
from midms_cli.images import load_image, save_png
from midms_cli.models.midm import MIDM, ExemplarFeatures, LoopResult
from midms_cli.sampler import REFINERS, translate

MODEL_KIND = "midms"
BUNDLED_MODEL = Path(midms_cli.__file__).parent / "assets" / "midms-tiny.safetensors"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
CONDITION_SUFFIXES = (".png", ".npy", ".safetensors", ".json", ".txt")

# --------------------------------------------------------------------------------------------
# Model files


def save_midm(path: str | os.PathLike, model: MIDM, extra: dict[str, Any] | None = None) -> None:
    """Write a model file (kind "midms"): all submodules and the config, atomically."""
    save_modules(path, model.modules_to_save(), model.config, MODEL_KIND, extra)


def resolve_model_file(path: str | os.PathLike | None) -> Path:
    """A model file, a run directory's model, or (None) the bundled model.

    In a run directory: the final `model.safetensors` (the EMA weights when EMA is on), unless the
    run was resumed since and has newer checkpoints; then the newest checkpoint.
    """
    if path is None:
        if not BUNDLED_MODEL.is_file():
            raise MidmsError(
                "no bundled model found; pass --model FILE (a model file or a training run directory)"
            )
        return BUNDLED_MODEL
    path = Path(path)
    if path.is_dir():
        latest, final = RunDir(path).latest(), path / "model.safetensors"
        if final.is_file() and (latest is None or final.stat().st_mtime_ns >= latest.stat().st_mtime_ns):
            return final
        if latest is None:
            raise MidmsError(
                f"{path} is a directory without checkpoints; pass a model file or a run directory"
            )
        return latest
    if not path.is_file():
        raise MidmsError(f"model file {path} does not exist")
    return path


def load_midm(path: str | os.PathLike, device: torch.device | str = "cpu", precision: str = "fp32") -> MIDM:
    """Rebuild a MIDM from a model file alone, in eval mode on `device`, networks at `precision`
    ("fp32" or "bf16", MIDM.set_precision).

    A file of another kind, a config that does not validate, or weights that do not fit the
    config is a MidmsError naming the file.
    """
    path = Path(path)
    metadata = read_metadata(path, expected_kind=MODEL_KIND)
    if "config" not in metadata:
        raise MidmsError(f"{path} has no model config in its metadata; it is not a midms model file")
    try:
        config = ModelConfig.from_dict(metadata["config"])
    except ConfigError as exc:
        raise MidmsError(f"{path} holds an invalid model config: {exc}") from None
    model = MIDM(config)
    load_modules(path, model.modules_to_save(), expected_kind=MODEL_KIND)
    return model.to(device).eval().set_precision(precision)


def _architecture(config: UNetConfig) -> dict[str, Any]:
    return {k: v for k, v in to_dict(config).items() if k != "dropout"}


def load_pretrained_unet(path: str | os.PathLike, model: MIDM, device: torch.device | str) -> torch.nn.Module:
    """The not-fine-tuned UNet of an imported LDM file (`midms weights import-ldm`), for refining."""
    from midms_cli.ldm_import import load_ldm

    configs, modules = load_ldm(Path(path))
    if "unet" not in modules or configs.unet is None:
        raise MidmsError(f"{path} holds only a first stage; --refine pretrained needs an LDM with a UNet")
    if _architecture(configs.unet) != _architecture(model.config.unet):
        raise MidmsError(
            f"{path}: its UNet does not match the model's UNet architecture; "
            "use the LDM the model was fine-tuned from"
        )
    # The refiner runs at the precision of the model's own UNet.
    dtype = next(model.unet.parameters()).dtype
    return modules["unet"].to(device).eval().to(dtype=dtype, memory_format=torch.channels_last)


# --------------------------------------------------------------------------------------------
# Sampler settings


def sampling_settings(
    model: MIDM,
    *,
    variant: str | None = None,
    steps: int | None = None,
    noise_level: float | None = None,
    refine: str | None = None,
) -> SamplingConfig:
    """The model's sampler settings with the user's overrides, validated.

    `steps` interleaved UNet steps at `noise_level` (the fraction of the DDIM grid that is run,
    official 4 steps at 0.25 of a 16-step grid, Table 4) give ddim_steps = round(steps / level).
    Re-warp positions keep the model's ones that still lie strictly inside the loop; a model whose
    loop is too short for any (fewer than 3 steps) stores none, and then the official ones apply.
    """
    sampling = model.config.sampling
    if variant is not None:
        sampling = apply_sampling_variant(sampling, variant)
    if refine is not None:
        if refine not in REFINERS:
            raise MidmsError(f"--refine {refine!r}: choose one of {', '.join(REFINERS)}")
        sampling = dataclasses.replace(sampling, refine=refine)
    if steps is not None or noise_level is not None:
        count = steps if steps is not None else sampling.interleaved_steps
        level = noise_level if noise_level is not None else sampling.interleaved_steps / sampling.ddim_steps
        if count < 1:
            raise MidmsError(f"--steps must be at least 1, got {count}")
        if not 0 < level < 1:
            raise MidmsError(f"--noise-level must lie strictly between 0 and 1, got {level}")
        stored = sampling.rewarp_positions
        if sampling.interleaved_steps < 3:  # nothing could be stored: fall back to the official positions
            stored = SamplingConfig().rewarp_positions
        positions = rewarp_positions_within(stored, count)
        sampling = dataclasses.replace(
            sampling,
            interleaved_steps=count,
            ddim_steps=max(round(count / level), count + 1),
            rewarp_positions=positions,
        )
    config = dataclasses.replace(model.config, sampling=sampling)
    validate(config)
    return sampling


# --------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class Pair:
    """One translation job: condition file, exemplar photo, optional exemplar condition, output."""

    condition: Path
    exemplar: Path
    output: Path
    exemplar_condition: Path | None = None


def _model_condition_kind(model: MIDM) -> str:
    return model.config.condition


def read_condition(model: MIDM, path: Path, size: int, extract: bool) -> Tensor:
    """(C, size, size) condition in [0, 1]: read from a file, or extracted from a photo (`extract`)."""
    kind = _model_condition_kind(model)
    if extract:
        photo = load_image(path, size)
        extractor = get_extractor(kind, next(model.parameters()).device)  # canny, openpose, ade20k
        condition = extractor(photo.unsqueeze(0))[0]
    else:
        condition = load_condition(path, kind, size)
    expected = model.config.correspondence.cond_channels
    if condition.shape[0] != expected:
        raise MidmsError(
            f"{path}: the condition has {condition.shape[0]} channels but the model expects "
            f"{expected} ({kind!r}); give a {kind!r} condition"
        )
    return condition


def read_exemplar(model: MIDM, path: Path, size: int, condition_path: Path | None) -> tuple[Tensor, Tensor]:
    """The exemplar photo (3, size, size) in [−1, 1] and its own condition (spec 1.3).

    The exemplar's condition is read from `condition_path`, else computed from the photo with
    the model's renderer (only for kinds that a bare photo determines, e.g. canny).
    """
    image = load_image(path, size)
    if condition_path is not None:
        return image, read_condition(model, condition_path, size, extract=False)
    kind = _model_condition_kind(model)
    if kind not in EXTRACTORS:
        raise MidmsError(
            f"the exemplar's own {kind!r} condition cannot be computed from the photo {path}; "
            "pass it with --ref-cond FILE"
        )
    return image, read_condition(model, path, size, extract=True)


def check_size(model: MIDM, size: int | None) -> int:
    """The working image size: the model's own unless --size asks otherwise (a multiple of the
    first stage's and UNet's downsampling)."""
    if size is None:
        return model.config.image_size
    factor = model.config.autoencoder.downsample * 2 ** (len(model.config.unet.channel_mult) - 1)
    if size < factor or size % factor:
        raise MidmsError(f"--size {size}: must be a positive multiple of {factor} for this model")
    return size


def _files(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in suffixes}


def pairs_from_folders(conditions: Path, exemplars: Path, out_dir: Path) -> list[Pair]:
    """Each condition file paired with the exemplar photo of the same file stem; output STEM.png."""
    condition_files = _files(conditions, CONDITION_SUFFIXES)
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


def check_pairs(model: MIDM, pairs: list[Pair], size: int, extract: bool) -> None:
    """Read every input of a batch once before any work, so a bad file late in the list fails the
    command before the first output is written (a single pair is checked as it is read)."""
    check_inputs_exist(pairs)
    if len(pairs) < 2:
        return
    exemplars = set()
    for pair in pairs:
        read_condition(model, pair.condition, size, extract)
        if (pair.exemplar, pair.exemplar_condition) not in exemplars:
            read_exemplar(model, pair.exemplar, size, pair.exemplar_condition)
            exemplars.add((pair.exemplar, pair.exemplar_condition))


# --------------------------------------------------------------------------------------------
# The step strip


def _to_image(map_: Tensor, size: tuple[int, int]) -> Tensor:
    """A (1, H, W) mask in {0, 1} as a (3, size) image in [−1, 1] (white = confident)."""
    return F.interpolate(map_[None], size=size, mode="nearest")[0].expand(3, -1, -1) * 2 - 1


@torch.no_grad()
def step_strip(model: MIDM, initial_warp: Tensor, loop: LoopResult) -> Tensor:
    """One row per interleaved step: [warp fed in, confidence mask, x0-prediction], decoded; (3, H', W').

    Row 0 shows the initial warp R0 (everything confident); re-warp rows show R_k and M_k; rows
    without a warp are grey in the first two columns.
    """
    rows = []
    for step in loop.steps:
        x0 = model.decode(step.x0_pred[:1]).clamp(-1, 1)[0]
        size = tuple(x0.shape[-2:])
        blank = torch.zeros_like(x0)
        if step.position == 0:
            warp, mask = model.decode(initial_warp[:1]).clamp(-1, 1)[0], torch.ones_like(x0)
        elif step.rewarp is not None:
            warp = model.decode(step.rewarp.warped[:1]).clamp(-1, 1)[0]
            mask = _to_image(step.rewarp.mask[0], size)
        else:
            warp, mask = blank, blank
        rows.append(torch.cat([warp, mask, x0], dim=2))
    return torch.cat(rows, dim=1)


# --------------------------------------------------------------------------------------------
# Translation


@dataclass
class TranslateOptions:
    size: int | None = None
    sampling: SamplingConfig | None = None
    seed: int = 0
    extract: bool = False
    save_steps: bool = False
    pretrained_unet: torch.nn.Module | None = None


def steps_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}.steps.png")


def translate_pairs(
    model: MIDM, pairs: list[Pair], options: TranslateOptions, progress: Callable[[int], None] | None = None
) -> list[dict[str, Any]]:
    """Translate each pair with a generator seeded by `options.seed` (a pair's image does not depend
    on the other pairs); exemplar features are reused while consecutive pairs share an exemplar."""
    size = check_size(model, options.size)
    check_pairs(model, pairs, size, options.extract)
    device = next(model.parameters()).device
    if options.extract:  # missing estimator weights fail here, before any work
        get_extractor(_model_condition_kind(model), device)
    results, cached_key, cached = [], None, None
    for index, pair in enumerate(pairs):
        # Read and check both inputs before anything is computed or written.
        condition = read_condition(model, pair.condition, size, options.extract)
        key = (pair.exemplar, pair.exemplar_condition)
        torch.manual_seed(options.seed)  # the KL posterior sample of an LSUN-style first stage
        if key != cached_key:
            image, exemplar_condition = read_exemplar(model, pair.exemplar, size, pair.exemplar_condition)
            with torch.no_grad():
                cached = model.encode_exemplar(image[None].to(device), exemplar_condition[None].to(device))
            cached_key = key
        result = _translate_one(model, condition.to(device), cached, options, device)
        save_png(result.image[0].cpu(), pair.output)
        record = {
            "condition": str(pair.condition),
            "exemplar": str(pair.exemplar),
            "output": str(pair.output),
        }
        if options.save_steps:
            strip = step_strip(model, result.initial_warp, result.loop)
            save_png(strip.cpu(), steps_path(pair.output))
            record["steps"] = str(steps_path(pair.output))
        results.append(record)
        if progress:
            progress(index + 1)
    return results


def _translate_one(
    model: MIDM,
    condition: Tensor,
    exemplar: ExemplarFeatures,
    options: TranslateOptions,
    device: torch.device,
):
    generator = torch.Generator(device=device).manual_seed(options.seed)
    return translate(
        model,
        condition[None],
        exemplar,
        sampling=options.sampling,
        generator=generator,
        pretrained_unet=options.pretrained_unet,
        capture=options.save_steps,
    )
