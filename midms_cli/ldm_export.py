"""Export the UNet and first stage of a model in the original latent-diffusion layout (the inverse
of `midms weights import-ldm`), so a model trained here goes back to the LDM ecosystem.

Written: `model.ckpt`, a LatentDiffusion checkpoint `{"state_dict": ...}` with `first_stage_model.*`,
`model.diffusion_model.*`, the noise schedule buffers `betas`, `alphas_cumprod`,
`alphas_cumprod_prev` and `scale_factor` (latent-diffusion recomputes its other schedule buffers
when it builds the model, and its loaders read checkpoints with strict=False), and the matching
`config.yaml`. The MIDMs correspondence networks have no place in that layout and are left out.
`import-ldm` reads both files back to the same tensors and configs (tested).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from midms_cli.atomic import atomic_path, write_text
from midms_cli.checkpoint import load_checkpoint
from midms_cli.config import AutoencoderConfig, DiffusionConfig, UNetConfig, from_dict
from midms_cli.diffusion.schedule import linear_betas
from midms_cli.errors import ConfigError, MidmsError
from midms_cli.ldm_import import _DDCONFIG_FIELDS, _UNET_FIELDS, LdmConfigs
from midms_cli.models import ldm_layout

EXPORTABLE_KINDS = ("midms", "ldm")
_TARGETS = {
    "ldm": "ldm.models.diffusion.ddpm.LatentDiffusion",
    "unet": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
    "vq": "ldm.models.autoencoder.VQModelInterface",
    "kl": "ldm.models.autoencoder.AutoencoderKL",
}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def first_stage_section(autoencoder: AutoencoderConfig) -> dict[str, Any]:
    """The `first_stage_config` of a LatentDiffusion YAML (inverse of ldm_import.autoencoder_config)."""
    params: dict[str, Any] = {
        "embed_dim": autoencoder.embed_dim,
        "ddconfig": {name: _plain(getattr(autoencoder, name)) for name in _DDCONFIG_FIELDS},
        "lossconfig": {"target": "torch.nn.Identity"},
    }
    if autoencoder.kind == "vq":
        params["n_embed"] = autoencoder.n_embed
    return {"target": _TARGETS[autoencoder.kind], "params": params}


def ldm_yaml_data(configs: LdmConfigs) -> dict[str, Any]:
    """A LatentDiffusion config.yaml as data (inverse of ldm_import.ldm_configs for a full LDM)."""
    assert configs.unet is not None and configs.diffusion is not None
    unet = {name: _plain(getattr(configs.unet, name)) for name in _UNET_FIELDS}
    return {
        "model": {
            "target": _TARGETS["ldm"],
            "params": {
                "linear_start": configs.diffusion.linear_start,
                "linear_end": configs.diffusion.linear_end,
                "timesteps": configs.diffusion.timesteps,
                "first_stage_key": "image",
                "image_size": configs.unet.image_size,
                "channels": configs.unet.in_channels,
                "scale_factor": configs.autoencoder.scale_factor,
                "cond_stage_config": "__is_unconditional__",
                "unet_config": {"target": _TARGETS["unet"], "params": unet},
                "first_stage_config": first_stage_section(configs.autoencoder),
            },
        }
    }


def schedule_buffers(diffusion: DiffusionConfig, scale_factor: float) -> dict[str, Tensor]:
    """LatentDiffusion's stored schedule buffers (float32, as latent-diffusion registers them)."""
    betas = linear_betas(diffusion.timesteps, diffusion.linear_start, diffusion.linear_end)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return {
        "betas": betas.float(),
        "alphas_cumprod": alphas_cumprod.float(),
        "alphas_cumprod_prev": torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]]).float(),
        "scale_factor": torch.tensor(float(scale_factor)),
    }


def read_exportable(path: Path) -> tuple[LdmConfigs, dict[str, Tensor]]:
    """The first stage + UNet configs and tensors (our keys) of a midms model or an imported LDM."""
    checkpoint = load_checkpoint(path)
    if checkpoint.kind not in EXPORTABLE_KINDS:
        raise MidmsError(
            f"{path} is a {checkpoint.kind!r} file; export-ldm takes a midms model or an imported LDM file"
        )
    config = checkpoint.metadata.get("config") or {}
    if "unet" not in config:
        raise MidmsError(f"{path} holds no UNet (a first stage alone); export-ldm writes a full LDM")
    try:
        configs = LdmConfigs(
            autoencoder=from_dict(AutoencoderConfig, config["autoencoder"], "autoencoder"),
            unet=from_dict(UNetConfig, config["unet"], "unet"),
            diffusion=from_dict(DiffusionConfig, config.get("diffusion", {}), "diffusion"),
        )
    except (ConfigError, KeyError) as exc:
        raise MidmsError(f"{path} holds an invalid config: {exc}") from None
    prefixes = (ldm_layout.FIRST_STAGE + ".", ldm_layout.UNET + ".")
    tensors = {key: value for key, value in checkpoint.tensors.items() if key.startswith(prefixes)}
    return configs, tensors


def export_ldm(model: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Write OUT_DIR/model.ckpt and OUT_DIR/config.yaml from a model file or a training run's
    folder (its final model, else its newest checkpoint); returns a summary."""
    import yaml  # as for import-ldm, only this command needs pyyaml

    from midms_cli.pipelines.translate import resolve_model_file

    path, out_dir = resolve_model_file(model), Path(out_dir)
    configs, ours = read_exportable(path)
    state = ldm_layout.to_ldm_state_dict(ours, "ldm")
    state.update(schedule_buffers(configs.diffusion, configs.autoencoder.scale_factor))
    ckpt, config_file = out_dir / "model.ckpt", out_dir / "config.yaml"
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(ckpt) as tmp:
        # The original format is a torch checkpoint of plain tensors: it loads with weights_only=True.
        torch.save({"state_dict": {k: v.contiguous() for k, v in state.items()}}, tmp)
    write_text(config_file, yaml.safe_dump(ldm_yaml_data(configs), sort_keys=False))
    return {
        "checkpoint": str(ckpt),
        "config": str(config_file),
        "tensors": len(state),
        "source": str(path),
        "parameters": {
            prefix: sum(v.numel() for k, v in ours.items() if k.startswith(prefix + "."))
            for prefix in (ldm_layout.FIRST_STAGE, ldm_layout.UNET)
        },
    }
