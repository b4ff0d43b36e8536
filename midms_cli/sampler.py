"""Algorithm 1 of MIDMs: initial cross-domain warp, interleaved matching + DDIM steps, then
refinement, then decoding.

Needs only what a user has at inference: the condition, the exemplar and the exemplar's own
condition (no ground-truth path). With the official settings one image costs 4 interleaved + 20
refinement UNet calls, one encode and one decode; the exemplar's features are computed once and
shared by every condition of a batch.

Noise: by default one generator gives the loop's noise, the refinement's noise and its per-step
noises (21 draws at the official settings). `OfficialNoiseOrder(seed)` instead consumes torch's
stream as the official MIDMs forward does, so a seed gives the official image: per loop step the
sampler's discarded initial draw, the q-sample noise (first step only) and the step noise (drawn
even at η = 0), for the exemplar chain and then for the ground-truth chain, plus one more such step
(the extra diffusion-loss step) at a position numpy draws; then the refinement's discarded draw,
its q-sample noise and one noise per step (43 draws at the official settings). Injected noises
(`InjectedNoise`) replace all of them, for tests. The order covers the sampler's draws: a first
stage that samples its KL posterior (LSUN-style) draws before them, from torch's global generator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from midms_cli.config import SamplingConfig
from midms_cli.diffusion import ddim_reenter, ddim_sigma, predict_x0, q_sample
from midms_cli.errors import MidmsError
from midms_cli.models.midm import MIDM, ExemplarFeatures, LoopResult, refinement_trajectory

REFINERS = ("finetuned", "pretrained", "none")
NOISE_ORDERS = ("midms", "official")  # one generator / the official forward's stream


@dataclass
class Translation:
    """The result of one batch: images in [−1, 1], final latents, and what the loop saw."""

    image: Tensor  # (B, 3, H, W), clamped to [-1, 1]
    latent: Tensor  # (B, c, h, w), the latent that was decoded
    initial_warp: Tensor  # R0
    loop: LoopResult | None = None  # per-step x0-predictions, warps and masks (when captured)
    noise: InjectedNoise | None = None  # the noises used, when given or drawn in the official order


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


# --- noise orders -----------------------------------------------------------------------------


@dataclass
class InjectedNoise:
    """Every noise one translation uses: the loop's q-sample noise, the refinement's q-sample noise
    and its per-step noises (one per refinement step; the last is drawn but never used)."""

    loop: Tensor
    refine: Tensor
    refine_steps: list[Tensor] = field(default_factory=list)
    draws: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)  # (role, shape) in order


def official_draw_roles(loop_steps: int, extra_position: int, refine_steps: int) -> list[str]:
    """The roles of the official forward's torch draws, in order (see the module docstring)."""
    roles: list[str] = []
    for position in range(loop_steps):
        chains = ["exemplar", "ground-truth"] + (["extra"] if position == extra_position else [])
        for chain in chains:
            first = position == 0 or chain == "extra"  # later steps continue from the stored x0 pair
            roles += ["discarded"] + ([f"{chain} q-sample"] if first else []) + [f"{chain} step"]
    return roles + ["discarded", "refine q-sample"] + ["refine step"] * refine_steps


@dataclass(frozen=True)
class OfficialNoiseOrder:
    """The official forward's random stream from one seed: torch's for the noises, numpy's legacy
    generator (as `np.random.seed`) for the position of the extra diffusion-loss step, which the
    official code draws with `np.random.randint(0, steps)` right after
    `np.random.choice(steps, steps, replace=False)`."""

    seed: int

    def extra_position(self, loop_steps: int) -> int:
        numbers = np.random.RandomState(self.seed)
        numbers.choice(loop_steps, loop_steps, replace=False)
        return int(numbers.randint(0, loop_steps))

    def draw(self, shape: tuple[int, ...], loop_steps: int, refine_steps: int, device) -> InjectedNoise:
        """All draws, float32 on `device`; the loop's, the refinement's and its steps' are kept."""
        generator = torch.Generator(device=device).manual_seed(self.seed)
        roles = official_draw_roles(loop_steps, self.extra_position(loop_steps), refine_steps)
        kept: dict[str, list[Tensor]] = {"exemplar q-sample": [], "refine q-sample": [], "refine step": []}
        for role in roles:
            tensor = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
            if role in kept:
                kept[role].append(tensor)
        return InjectedNoise(
            loop=kept["exemplar q-sample"][0],
            refine=kept["refine q-sample"][0],
            refine_steps=kept["refine step"],
            draws=[(role, tuple(shape)) for role in roles],
        )


def refine_with_noise(
    model: MIDM, unet: nn.Module, latent: Tensor, sampling: SamplingConfig, noise: InjectedNoise
) -> Tensor:
    """`refine` with given noises: q-sample with `noise.refine`, step i re-enters with
    `noise.refine_steps[i]` (MIDM.denoise draws the same from its generator)."""
    plan = refinement_trajectory(sampling, model.alphas_cumprod)
    if len(noise.refine_steps) < len(plan.steps) - 1:
        raise ValueError(f"{len(plan.steps)} refinement steps need {len(plan.steps) - 1} step noises")
    x = q_sample(latent, plan.t_noise, noise.refine.to(latent), model.alphas_cumprod)
    for index, step in enumerate(plan.steps):
        eps = model.eps(unet, x, step.t)
        x0 = predict_x0(x, eps, step.a_t)
        if index < len(plan.steps) - 1:  # the output is the last x0-prediction
            sigma = ddim_sigma(step.a_t, step.a_prev, sampling.refine_eta)
            x = ddim_reenter(x0, eps, step.a_prev, sigma, noise.refine_steps[index].to(x0))
    return x0


def refine(
    model: MIDM,
    unet: nn.Module,
    latent: Tensor,
    sampling: SamplingConfig,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Noise the latent back to t_noise (official 101) and denoise with η = refine_eta
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
    noise: InjectedNoise | OfficialNoiseOrder | None = None,
    phases: Callable[[str], None] | None = None,
) -> Translation:
    """Algorithm 1 for a batch of conditions (B, nc, H, W) and one exemplar or B of them.

    `exemplar` is a photo (1 or B, 3, H, W) in [−1, 1] with its condition `exemplar_condition`,
    or features already computed by `model.encode_exemplar` (reuse across calls). `noise`: None
    draws from `generator`; an `OfficialNoiseOrder` draws in the official forward's order (its
    record is `Translation.noise.draws`); `InjectedNoise` gives every noise (the loop needs η = 0,
    as the official loop). `phases` is told each phase before it runs ("encode", "condition", "loop",
    "refine" or "refine-separate", "decode"), so that only its networks need be in memory
    (`models.model_file.StagedWeights`).
    """
    enter = phases or (lambda phase: None)
    sampling = sampling or model.config.sampling
    refiner = choose_refiner(model, sampling.refine, pretrained_unet)
    if noise is not None and sampling.eta != 0:
        raise MidmsError(f"the official noise order and injected noise need the loop's eta 0 (got "
                         f"{sampling.eta}), as the official sampler; use the default noise order")

    # 1. Exemplar and condition features; the initial cross-domain warp R0 (Eq. 5-6).
    if isinstance(exemplar, Tensor):
        if exemplar_condition is None:
            raise ValueError("an exemplar photo needs its own condition map")
        enter("encode")
        exemplar = model.encode_exemplar(exemplar, exemplar_condition)
    exemplar = exemplar.expand(condition.shape[0])
    enter("condition")
    cond = model.condition_features(condition)
    warped = model.initial_match(cond, exemplar, sampling.tau)
    if isinstance(noise, OfficialNoiseOrder):
        refine_steps = len(refinement_trajectory(sampling, model.alphas_cumprod).steps) if refiner else 0
        noise = noise.draw(tuple(warped.shape), sampling.interleaved_steps, refine_steps, warped.device)

    # 2-4. Interleaved DDIM steps with re-warping from the x0-prediction (Eq. 7-11).
    loop_noise = _noise(warped, generator) if noise is None else noise.loop.to(warped)
    enter("loop")
    loop = model.interleaved_loop(warped, cond, exemplar, loop_noise, sampling, generator=generator)
    latent = loop.x0

    # 5. Refinement by a diffusion model, then decoding.
    if refiner is not None:
        enter("refine" if refiner is model.unet else "refine-separate")
        if noise is None:
            latent = refine(model, refiner, latent, sampling, generator)
        else:
            latent = refine_with_noise(model, refiner, latent, sampling, noise)
    enter("decode")
    image = model.decode(latent).clamp(-1, 1)
    return Translation(image, latent, warped, loop if capture else None, noise)
