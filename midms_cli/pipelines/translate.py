"""Translate conditions into images in the style of exemplars with a trained MIDMs model file.

Model files are safetensors of kind "midms" holding `first_stage.`, `unet.` and `correspondence.`
with the ModelConfig JSON in the metadata (key "config"), so the file alone rebuilds the model.
Every input is read and checked before any output is written; outputs are PNGs written atomically.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import midms_cli
from midms_cli.atomic import atomic_path
from midms_cli.checkpoint import RunDir, read_metadata, save_modules
from midms_cli.conditions.io import save_condition
from midms_cli.config import (
    SAMPLING_BUNDLES,
    ModelConfig,
    SamplingConfig,
    UNetConfig,
    apply_sampling_variant,
    rewarp_positions_within,
    to_dict,
    validate,
)
from midms_cli.errors import ConfigError, MidmsError
from midms_cli.extractors import get_extractor
from midms_cli.images import save_png
from midms_cli.models.midm import MIDM, ExemplarFeatures
from midms_cli.models.model_file import StagedWeights, midm_from_file
from midms_cli.pipelines.inputs import (  # noqa: F401  (Pair and the readers are this module's API too)
    CONDITION_SUFFIXES,
    IMAGE_SUFFIXES,
    Notice,
    Pair,
    check_pairs,
    check_size,
    pairs_from_folders,
    read_condition,
    read_exemplar,
    read_pairs_file,
)
from midms_cli.pipelines.step_strip import labelled_strip, row_titles, step_strip
from midms_cli.sampler import REFINERS, OfficialNoiseOrder, translate

MODEL_KIND = "midms"
BUNDLED_MODEL = Path(midms_cli.__file__).parent / "assets" / "midms-tiny.safetensors"

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


def model_file_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig a model file holds; a file of another kind or an invalid config is a
    MidmsError naming the file."""
    path = Path(path)
    metadata = read_metadata(path, expected_kind=MODEL_KIND)
    if "config" not in metadata:
        raise MidmsError(f"{path} has no model config in its metadata; it is not a midms model file")
    try:
        return ModelConfig.from_dict(metadata["config"])
    except ConfigError as exc:
        raise MidmsError(f"{path} holds an invalid model config: {exc}") from None


def load_midm(path: str | os.PathLike, device: torch.device | str = "cpu", precision: str = "fp32") -> MIDM:
    """Rebuild a MIDM from a model file alone, in eval mode on `device`, networks at `precision`
    ("fp32" or "bf16", MIDM.set_precision).

    A file of another kind, a config that does not validate, or weights that do not fit the
    config is a MidmsError naming the file.
    """
    # One copy of the weights, read straight into parameters of the compute dtype.
    return midm_from_file(path, model_file_config(path), device, precision)


def load_staged(
    path: str | os.PathLike, device: torch.device | str = "cpu", precision: str = "fp32"
) -> StagedWeights:
    """As `load_midm`, with each network read only while a phase of the translation runs it
    (`TranslateOptions.phases = staged.enter`); every entry is checked now."""
    return StagedWeights(path, model_file_config(path), device, precision)


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
    # The refiner runs at the precision (dtype and layout) of the model's own UNet.
    return model.prepare_unet(modules["unet"].to(device).eval())


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
# Translation


@dataclass
class TranslateOptions:
    size: int | None = None
    sampling: SamplingConfig | None = None
    seed: int = 0
    extract: bool = False
    save_steps: bool = False
    pretrained_unet: torch.nn.Module | None = None
    noise_order: str = "midms"  # "official": the official forward's random stream from `seed`
    fit: str = "crop"  # how non-square inputs become square (inputs.FITS)
    save_condition: Path | None = None  # where to write the condition of a single pair, as used
    phases: Callable[[str], None] | None = None  # told each phase of a translation (sampler.translate)
    notice: Notice | None = None  # receives notes and warnings (the CLI prints them on stderr)


def steps_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}.steps.png")


def describe_sampler(sampling: SamplingConfig) -> dict[str, Any]:
    """The sampler a translation actually ran: "official" or "corrected" only when every setting
    is that bundle's default, else "custom" with the settings that differ from the official ones."""
    settings = to_dict(sampling)
    name = "custom"
    for bundle in SAMPLING_BUNDLES:
        if settings == to_dict(apply_sampling_variant(SamplingConfig(), bundle)):
            name = bundle
    official = to_dict(SamplingConfig())
    return {
        "name": name,
        "quirks": sampling.variant,  # which bundle the grid / noise offset / mask rules come from
        "interleaved_steps": sampling.interleaved_steps,
        "ddim_steps": sampling.ddim_steps,
        "refine": sampling.refine,
        "differs_from_official": {
            key: value for key, value in settings.items() if key != "variant" and value != official[key]
        },
    }


def check_save_condition(model: MIDM, path: Path | None, pairs: list[Pair]) -> None:
    """--save-condition names one file for one pair, in a format that holds the model's channels."""
    if path is None:
        return
    if len(pairs) != 1:
        raise MidmsError("--save-condition writes the condition of one pair; drop it in batch mode")
    suffix = path.suffix.lower()
    if suffix not in (".png", ".npy", ".safetensors"):
        raise MidmsError(f"--save-condition {path}: name the file .png, .npy or .safetensors")
    channels = model.config.correspondence.cond_channels
    if suffix == ".png" and channels not in (1, 3):
        raise MidmsError(
            f"--save-condition {path}: a PNG holds 1 or 3 channels, a {model.config.condition!r} "
            f"condition has {channels}; name the file .npy or .safetensors"
        )


def translate_pairs(
    model: MIDM, pairs: list[Pair], options: TranslateOptions, progress: Callable[[int], None] | None = None
) -> list[dict[str, Any]]:
    """Translate each pair with a generator seeded by `options.seed` (a pair's image does not depend
    on the other pairs); exemplar features are reused while consecutive pairs share an exemplar."""
    notice = options.notice or (lambda message: None)
    size = check_size(model, options.size, notice)
    check_save_condition(model, options.save_condition, pairs)
    check_pairs(model, pairs, size, options.extract, options.fit)
    device = model.device
    if options.extract:  # missing estimator weights fail here, before any work
        get_extractor(model.config.condition, device)
    results, cached_key, cached = [], None, None
    for index, pair in enumerate(pairs):
        # Read and check both inputs before anything is computed or written.
        condition = read_condition(model, pair.condition, size, options.extract, options.fit, notice)
        key = (pair.exemplar, pair.exemplar_condition)
        torch.manual_seed(options.seed)  # the KL posterior sample of an LSUN-style first stage
        if key != cached_key:
            image, exemplar_condition = read_exemplar(
                model, pair.exemplar, size, pair.exemplar_condition, options.fit, notice
            )
            if options.phases:
                options.phases("encode")
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
        if options.save_condition is not None:
            save_condition(condition, options.save_condition)
            record["saved_condition"] = str(options.save_condition)
        if options.save_steps:
            if options.phases:
                options.phases("decode")
            strip = step_strip(model, result.initial_warp, result.loop)
            strip = labelled_strip(strip, row_titles(result.loop))
            with atomic_path(steps_path(pair.output)) as tmp:
                strip.save(tmp, format="PNG")
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
        noise=OfficialNoiseOrder(options.seed) if options.noise_order == "official" else None,
        phases=options.phases,
    )
