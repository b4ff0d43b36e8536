"""Import a latent-diffusion model (config.yaml + model.ckpt) as a midms safetensors file.

Two inputs are accepted: a full LatentDiffusion checkpoint (first stage + UNet, e.g. celeba256,
lsun_churches) and a first-stage-only one (VQModel / AutoencoderKL, e.g. vq-f4, kl-f8). The YAML is
read as data (its `target:` strings only choose VQ or KL, nothing is imported from them), the
checkpoint with torch.load(weights_only=True). Every key is mapped (models/ldm_layout.py) and
every shape checked before anything is written.
"""

from __future__ import annotations

import contextlib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from midms_cli.checkpoint import load_checkpoint, save_modules
from midms_cli.config import AutoencoderConfig, DiffusionConfig, UNetConfig, from_dict, to_dict
from midms_cli.diffusion.schedule import linear_betas
from midms_cli.errors import MidmsError
from midms_cli.models import ldm_layout
from midms_cli.models.autoencoder import build_autoencoder
from midms_cli.models.unet import UNetModel
from midms_cli.weights import read_state_dict

KIND = "ldm"

# openaimodel.UNetModel arguments we read, and those that must keep their default (value shown)
# because the unconditional UNets of the LDM zoo never change them.
_UNET_FIELDS = ("image_size", "in_channels", "out_channels", "model_channels", "num_res_blocks",
                "attention_resolutions", "channel_mult", "num_heads", "num_head_channels",
                "use_scale_shift_norm", "resblock_updown", "dropout")
_UNET_FIXED: dict[str, Any] = {"dims": 2, "conv_resample": True, "use_new_attention_order": False,
                               "use_spatial_transformer": False, "num_classes": None, "context_dim": None,
                               "n_embed": None}
# Arguments that change memory or speed only, never the function or the weights.
_UNET_IGNORED = ("use_checkpoint", "use_fp16", "num_heads_upsample", "legacy", "transformer_depth")
_DDCONFIG_FIELDS = ("double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult",
                    "num_res_blocks", "attn_resolutions", "dropout")


@dataclass
class LdmConfigs:
    """What a latent-diffusion YAML describes: always a first stage; a UNet and schedule for a full LDM."""

    autoencoder: AutoencoderConfig
    unet: UNetConfig | None = None
    diffusion: DiffusionConfig | None = None

    @property
    def layout(self) -> str:
        return "ldm" if self.unet is not None else "first-stage"

    def to_dict(self) -> dict[str, Any]:
        parts = {"autoencoder": self.autoencoder, "unet": self.unet, "diffusion": self.diffusion}
        return {name: to_dict(part) for name, part in parts.items() if part is not None}


# --------------------------------------------------------------------------------------------
# YAML -> typed configs


def read_yaml(path: Path) -> dict[str, Any]:
    """The YAML as plain data (safe_load: no objects are constructed), its model under `model:`.

    A YAML whose top level is `first_stage_config:` (a first stage's `target` + `params`) is read
    as that first stage's config.
    """
    import yaml  # only this command needs pyyaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MidmsError(f"config not found: {path}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise MidmsError(
            f"cannot read {path} as YAML ({type(exc).__name__}); pass the model's config.yaml"
        ) from None
    if isinstance(data, dict) and "model" not in data and isinstance(data.get("first_stage_config"), dict):
        # A first stage described on its own, as the section a LatentDiffusion config nests.
        return {"model": data["first_stage_config"]}
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise MidmsError(f"{path} has no `model:` (or first-stage `first_stage_config:`) section; "
                         "pass the latent-diffusion config.yaml")
    return data


def _params(section: Any, where: str) -> dict[str, Any]:
    if not isinstance(section, dict) or not isinstance(section.get("params", {}), dict):
        raise MidmsError(f"config: {where} must be a mapping with `params:`")
    return section.get("params") or {}


def _first_stage_kind(target: Any, where: str) -> str:
    """"vq" or "kl" from the class name in `target:` (read as text, never imported)."""
    name = str(target).rsplit(".", 1)[-1]
    if name.startswith("VQModel"):
        return "vq"
    if name == "AutoencoderKL":
        return "kl"
    raise MidmsError(f"config: {where}.target {target!r} is not a VQModel or AutoencoderKL first stage")


def autoencoder_config(section: dict[str, Any], where: str) -> AutoencoderConfig:
    """AutoencoderConfig from a VQModel / AutoencoderKL section (`target` + `params.ddconfig`)."""
    kind = _first_stage_kind(section.get("target"), where)
    params = _params(section, where)
    ddconfig = params.get("ddconfig")
    if not isinstance(ddconfig, dict):
        raise MidmsError(f"config: {where}.params.ddconfig is missing")
    unsupported = ddconfig.get("attn_type", "vanilla") != "vanilla" or ddconfig.get("tanh_out")
    if unsupported or ddconfig.get("give_pre_end"):
        raise MidmsError(f"config: {where}.params.ddconfig uses attn_type/tanh_out/give_pre_end, which midms "
                         "does not implement")
    values = {name: ddconfig[name] for name in _DDCONFIG_FIELDS if name in ddconfig}
    if "embed_dim" not in params:
        raise MidmsError(f"config: {where}.params.embed_dim is missing")
    values["embed_dim"] = params["embed_dim"]
    if kind == "vq":
        if "n_embed" not in params:
            raise MidmsError(f"config: {where}.params.n_embed is missing")
        values["n_embed"] = params["n_embed"]
    else:
        values["n_embed"] = 0
        values["posterior"] = "sample"  # MIDMs' official code encodes KL latents with a posterior sample
    # Typed like a midms config: a YAML string where a number belongs is named, not a TypeError later.
    return _typed(AutoencoderConfig, {"kind": kind, **values}, f"{where}.params")


def _typed(cls: type, values: dict[str, Any], where: str) -> Any:
    """`cls` from YAML values, each converted to its field's type (lists to tuples) or refused by name."""
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if hints.get(name) is float and isinstance(value, str):  # YAML 1.1 reads `1e-4` as a string
            with contextlib.suppress(ValueError):
                values[name] = float(value)
    try:
        return from_dict(cls, values, where)
    except MidmsError as exc:
        raise MidmsError(f"config: {exc}") from None


def unet_config(section: dict[str, Any]) -> UNetConfig:
    """UNetConfig from `unet_config` (openaimodel.UNetModel's defaults where a key is absent)."""
    params = _params(section, "model.params.unet_config")
    for name, default in _UNET_FIXED.items():
        if params.get(name, default) != default:
            raise MidmsError(f"config: unet_config.params.{name} = {params[name]!r} is not supported "
                             f"(midms implements unconditional UNets with {name} = {default!r})")
    unknown = sorted(set(params) - set(_UNET_FIELDS) - set(_UNET_FIXED) - set(_UNET_IGNORED))
    if unknown:
        raise MidmsError(f"config: unet_config.params.{unknown[0]} is not a parameter midms understands")
    missing = [n for n in ("image_size", "in_channels", "out_channels", "model_channels", "num_res_blocks",
                           "attention_resolutions", "channel_mult") if n not in params]
    if missing:
        raise MidmsError(f"config: unet_config.params.{missing[0]} is missing")
    values = {name: params[name] for name in _UNET_FIELDS if name in params}
    values.setdefault("num_heads", -1)  # openaimodel defaults: both -1, one must be set
    values.setdefault("num_head_channels", -1)
    unet = _typed(UNetConfig, values, "unet_config.params")
    if unet.num_heads <= 0 and unet.num_head_channels <= 0:
        raise MidmsError("config: unet_config.params needs num_heads or num_head_channels")
    return unet


def diffusion_config(params: dict[str, Any]) -> DiffusionConfig:
    """The LDM "linear" schedule (ε-parameterisation only) from LatentDiffusion's params."""
    if params.get("beta_schedule", "linear") != "linear":
        raise MidmsError(f"config: model.params.beta_schedule {params['beta_schedule']!r} is not supported "
                         "(midms implements LDM's \"linear\")")
    if params.get("parameterization", "eps") != "eps":
        raise MidmsError("config: model.params.parameterization must be \"eps\" (midms predicts noise)")
    # DDPM's defaults in latent-diffusion, used when the YAML leaves them out.
    values = {"timesteps": params.get("timesteps", 1000), "linear_start": params.get("linear_start", 1e-4),
              "linear_end": params.get("linear_end", 2e-2)}
    return _typed(DiffusionConfig, values, "model.params")


def ldm_configs(data: dict[str, Any]) -> LdmConfigs:
    """Our configs from a latent-diffusion YAML (a LatentDiffusion or a bare first stage)."""
    model = data["model"]
    params = _params(model, "model")
    if "unet_config" not in params:
        return LdmConfigs(autoencoder=autoencoder_config(model, "model"))
    if params.get("cond_stage_config", "__is_unconditional__") != "__is_unconditional__" or params.get(
        "conditioning_key"
    ):
        raise MidmsError("config: a conditional LDM (cond_stage_config / conditioning_key) is not supported; "
                         "MIDMs builds on unconditional LDMs")
    if "first_stage_config" not in params:
        raise MidmsError("config: model.params.first_stage_config is missing")
    autoencoder = autoencoder_config(params["first_stage_config"], "model.params.first_stage_config")
    scale = params.get("scale_factor", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise MidmsError(f"config: model.params.scale_factor: expected a number, got {scale!r}")
    autoencoder.scale_factor = float(scale)
    return LdmConfigs(autoencoder=autoencoder, unet=unet_config(params["unet_config"]),
                      diffusion=diffusion_config(params))


# --------------------------------------------------------------------------------------------
# Modules and state dicts


def build_modules(configs: LdmConfigs) -> dict[str, nn.Module]:
    """Fresh modules under our checkpoint prefixes ("first_stage", "unet")."""
    modules: dict[str, nn.Module] = {ldm_layout.FIRST_STAGE: build_autoencoder(configs.autoencoder)}
    if configs.unet is not None:
        modules[ldm_layout.UNET] = UNetModel(configs.unet)
    return modules


def expected_shapes(configs: LdmConfigs) -> dict[str, torch.Size]:
    """Our key -> shape for the configs, computed on the meta device (no memory, no time)."""
    with torch.device("meta"):
        modules = build_modules(configs)
    return {
        f"{prefix}.{name}": t.shape for prefix, m in modules.items() for name, t in m.state_dict().items()
    }


def modules_with_weights(configs: LdmConfigs, tensors: dict[str, Tensor]) -> dict[str, nn.Module]:
    """Modules built on the meta device and given `tensors` (our keys) as float32 parameters.

    Skipping the random initialisation and the second copy matters for the 274M-parameter UNet.
    """
    with torch.device("meta"):
        modules = build_modules(configs)
    for prefix, module in modules.items():
        start = prefix + "."
        state = {k[len(start):]: v.float().contiguous() for k, v in tensors.items() if k.startswith(start)}
        module.load_state_dict(state, strict=True, assign=True)
    return modules


def check_schedule(original: dict[str, Tensor], diffusion: DiffusionConfig) -> None:
    """The checkpoint's stored β must be the schedule the YAML describes (or the YAML is another model's)."""
    if "betas" not in original:
        return
    stored = original["betas"].to(torch.float64)
    expected = linear_betas(diffusion.timesteps, diffusion.linear_start, diffusion.linear_end)
    if stored.shape != expected.shape or not torch.allclose(stored, expected, rtol=1e-5, atol=1e-8):
        raise MidmsError("checkpoint 'betas' do not match the config's linear_start/linear_end/timesteps; "
                         "check that --config belongs to this checkpoint")


def stored_scale_factor(original: dict[str, Tensor], configs: LdmConfigs) -> None:
    """LDMs trained with scale_by_std keep the learned factor as a buffer; it overrides the YAML's 1.0."""
    if "scale_factor" in original and configs.unet is not None:
        configs.autoencoder.scale_factor = float(original["scale_factor"].reshape(-1)[0])


def import_ldm(config_path: Path, ckpt_path: Path, out: Path, ema: bool = False) -> dict[str, Any]:
    """Read, map, check, then write `out` (kind "ldm", prefixes first_stage./unet.); returns a summary."""
    configs = ldm_configs(read_yaml(config_path))
    if ema and configs.unet is None:
        raise MidmsError("--ema applies to full LDM checkpoints; a first-stage checkpoint has no EMA weights")
    if not Path(ckpt_path).is_file():
        raise MidmsError(f"checkpoint not found: {ckpt_path}")
    original = read_state_dict(Path(ckpt_path))
    if configs.diffusion is not None:
        check_schedule(original, configs.diffusion)
    stored_scale_factor(original, configs)
    ours = ldm_layout.from_ldm_state_dict(original, expected_shapes(configs), configs.layout, ema)
    modules = modules_with_weights(configs, ours)
    extra = {"source": {"config": Path(config_path).name, "checkpoint": Path(ckpt_path).name,
                        "layout": configs.layout, "ema": ema}}
    save_modules(out, modules, configs.to_dict(), KIND, extra)
    return {
        "out": str(out),
        "kind": KIND,
        "layout": configs.layout,
        "ema": ema,
        "tensors": len(ours),
        "parameters": {p: sum(t.numel() for t in m.parameters()) for p, m in modules.items()},
        "config": configs.to_dict(),
    }


def load_ldm(path: Path) -> tuple[LdmConfigs, dict[str, nn.Module]]:
    """An imported LDM file back as configs and loaded modules ("first_stage" and, if present, "unet")."""
    ckpt = load_checkpoint(path, expected_kind=KIND)
    config = ckpt.metadata.get("config") or {}
    configs = LdmConfigs(
        autoencoder=from_dict(AutoencoderConfig, config.get("autoencoder"), "autoencoder"),
        unet=from_dict(UNetConfig, config["unet"], "unet") if "unet" in config else None,
        diffusion=(
            from_dict(DiffusionConfig, config["diffusion"], "diffusion") if "diffusion" in config else None
        ),
    )
    return configs, modules_with_weights(configs, ckpt.tensors)
