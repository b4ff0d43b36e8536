"""Key layout of latent-diffusion checkpoints and its two-way mapping to ours.

Our modules use the original parameter names, so the mapping only moves prefixes:

    ours                   latent-diffusion LatentDiffusion     first-stage-only (VQModel/AutoencoderKL)
    first_stage.<name>     first_stage_model.<name>             <name>
    unet.<name>            model.diffusion_model.<name>         -
                           model_ema.diffusion_model<name without dots>   (LitEma strips every '.')

Keys the original stores that are not network weights (schedule buffers, EMA bookkeeping, the
first stage's training loss) are listed here and dropped; anything else is an error naming the key.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from midms_cli.errors import MidmsError

FIRST_STAGE = "first_stage"
UNET = "unet"

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_EMA_PREFIX = "model_ema.diffusion_model"
LDM_FIRST_STAGE_PREFIX = "first_stage_model."

LAYOUTS = ("ldm", "first-stage")

# LatentDiffusion's registered buffers (DDPM.register_schedule, scale_by_std, LitEma bookkeeping):
# derived from the YAML or unused by an ε-predicting sampler.
LDM_NON_WEIGHT_KEYS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "lvlb_weights",
        "logvar",
        "scale_factor",
        "model_ema.decay",
        "model_ema.num_updates",
    }
)


def ema_key(name: str) -> str:
    """LitEma's buffer name for UNet parameter `name`: the prefix plus the name with its dots removed."""
    return LDM_EMA_PREFIX + name.replace(".", "")


def original_key(our_key: str, layout: str = "ldm", ema: bool = False) -> str:
    """The latent-diffusion key holding our tensor `our_key` ("first_stage.*" or "unet.*")."""
    prefix, _, name = our_key.partition(".")
    if prefix == FIRST_STAGE:
        return LDM_FIRST_STAGE_PREFIX + name if layout == "ldm" else name
    if prefix == UNET and layout == "ldm":
        return ema_key(name) if ema else LDM_UNET_PREFIX + name
    raise ValueError(f"{our_key!r} has no place in the {layout!r} layout")


def is_dropped(original: str, layout: str) -> bool:
    """Original keys that hold no weights we use: training-loss nets, schedule buffers, EMA bookkeeping."""
    if layout == "first-stage":
        return original.startswith("loss.")
    return (
        original in LDM_NON_WEIGHT_KEYS
        or original.startswith(LDM_FIRST_STAGE_PREFIX + "loss.")
    )


def has_ema(original: Mapping[str, Tensor]) -> bool:
    """Whether an LDM state dict carries LitEma copies of the UNet."""
    return any(k.startswith(LDM_EMA_PREFIX) for k in original)


def from_ldm_state_dict(
    original: Mapping[str, Tensor],
    expected: Mapping[str, torch.Size],
    layout: str = "ldm",
    ema: bool = False,
) -> dict[str, Tensor]:
    """Our state dict (keys of `expected`) from an original one; every key accounted for.

    `expected` maps each of our keys to its shape (from the freshly built modules). A key we need
    that is absent, a tensor of another shape, or an original key that is neither used nor a known
    non-weight entry raises MidmsError naming the key.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}")
    ours: dict[str, Tensor] = {}
    used: set[str] = set()
    # The UNet copy (EMA or not) that was not chosen is dropped, but only under names it may have.
    unchosen = {
        original_key(k, layout, not ema) for k in expected if layout == "ldm" and k.startswith(UNET + ".")
    }
    for key, shape in expected.items():
        source = original_key(key, layout, ema)
        if source not in original:
            no_ema = ema and key.startswith(UNET + ".") and not has_ema(original)
            hint = " (the checkpoint has no EMA weights; use --no-ema)" if no_ema else ""
            raise MidmsError(f"checkpoint is missing {source!r} (needed for {key}){hint}; "
                             "check that --config is the config.yaml that belongs to this checkpoint")
        tensor = original[source]
        if tuple(tensor.shape) != tuple(shape):
            raise MidmsError(f"checkpoint tensor {source!r} has shape {tuple(tensor.shape)}, the config "
                             f"gives {tuple(shape)}; check that --config belongs to this checkpoint")
        ours[key] = tensor
        used.add(source)
    for source in original:
        if source not in used and source not in unchosen and not is_dropped(source, layout):
            raise MidmsError(f"checkpoint has an unexpected key {source!r} that the config does not explain; "
                             "check that --config belongs to this checkpoint")
    return ours


def to_ldm_state_dict(
    ours: Mapping[str, Tensor], layout: str = "ldm", include_ema: bool = False
) -> dict[str, Tensor]:
    """The original-format state dict of ours (inverse of from_ldm_state_dict).

    With include_ema the UNet is also written as the LitEma copy (same values), as a LatentDiffusion
    checkpoint saved with use_ema holds both.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}")
    original: dict[str, Tensor] = {}
    for key, tensor in ours.items():
        original[original_key(key, layout)] = tensor
        if include_ema and key.startswith(UNET + "."):
            original[original_key(key, layout, ema=True)] = tensor
    return original
