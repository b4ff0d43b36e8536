"""Algorithm 1 of MIDMs, as the official code runs it: initial cross-domain warp, interleaved matching + DDIM
steps, then refinement, then decoding.

Needs only what a user has at inference: the condition, the exemplar and the exemplar's own
condition (no ground-truth path). With the official settings one image costs 4
interleaved + 20 refinement UNet calls, one encode and one decode; the exemplar's
features are computed once and shared by every condition of a batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from midms_cli.config import SamplingConfig
from midms_cli.errors import MidmsError
from midms_cli.models.midm import MIDM, ExemplarFeatures, LoopResult, refinement_trajectory

REFINERS = ("finetuned", "pretrained", "none")


@dataclass
class Translation:
    """The result of one batch: images in [−1, 1], final latents, and what the loop saw."""

    image: Tensor  # (B, 3, H, W), clamped to [-1, 1]
    latent: Tensor  # (B, c, h, w), the latent that was decoded
    initial_warp: Tensor  # R0
    loop: LoopResult | None = None  # per-step x0-predictions, warps and masks (when captured)


def choose_refiner(model: MIDM, refine: str, pretrained: nn.Module | None) -> nn.Module | None:
    """The UNet that refines: the model's own ("finetuned", official), a separate
    pretrained one ("pretrained", the paper's description), or none."""
    if refine == "finetuned":
        return model.unet
    if refine == "pretrained":
        if pretrained is None:
            raise MidmsError(
                "refine 'pretrained' needs the pretrained diffusion UNet; pass --pretrained FILE "
                "(an imported LDM) or use --refine finetuned"
            )
        return pretrained
    if refine == "none":
        return None
    raise MidmsError(f"unknown refiner {refine!r}; choose one of: {', '.join(REFINERS)}")


def _noise(like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


def refine(
    model: MIDM,
    unet: nn.Module,
    latent: Tensor,
    sampling: SamplingConfig,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The refinement: noise the latent back to t_noise (official 101) and denoise with η = refine_eta
    (official 1) down the refine grid (official 96, 91, ..., 1); returns the last x0-prediction."""
    plan = refinement_trajectory(sampling, model.alphas_cumprod)
    return model.denoise(unet, latent, plan, _noise(latent, generator), sampling.refine_eta, generator)


@torch.no_grad()
def translate(
    model: MIDM,
    condition: Tensor,
    exemplar: Tensor | ExemplarFeatures,
    exemplar_condition: Tensor | None = None,
    *,
    sampling: SamplingConfig | None = None,
    generator: torch.Generator | None = None,
    pretrained_unet: nn.Module | None = None,
    capture: bool = False,
) -> Translation:
    """Algorithm 1 for a batch of conditions (B, nc, H, W) and one exemplar or B of them.

    `exemplar` is a photo (1 or B, 3, H, W) in [−1, 1] with its condition `exemplar_condition`,
    or features already computed by `model.encode_exemplar` (reuse across calls).
    """
    sampling = sampling or model.config.sampling
    refiner = choose_refiner(model, sampling.refine, pretrained_unet)

    # 1. Exemplar and condition features; the initial cross-domain warp R0 (Eq. 5-6).
    if isinstance(exemplar, Tensor):
        if exemplar_condition is None:
            raise ValueError("an exemplar photo needs its own condition map")
        exemplar = model.encode_exemplar(exemplar, exemplar_condition)
    exemplar = exemplar.expand(condition.shape[0])
    cond = model.condition_features(condition)
    warped = model.initial_match(cond, exemplar, sampling.tau)

    # 2-4. Interleaved DDIM steps with re-warping from the x0-prediction (Eq. 7-11).
    loop = model.interleaved_loop(
        warped, cond, exemplar, _noise(warped, generator), sampling, generator=generator
    )
    latent = loop.x0

    # 5. Refinement by a diffusion model, then decoding.
    if refiner is not None:
        latent = refine(model, refiner, latent, sampling, generator)
    image = model.decode(latent).clamp(-1, 1)
    return Translation(image, latent, warped, loop if capture else None)
