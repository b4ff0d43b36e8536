"""The MIDMs model: frozen first stage, diffusion UNet and correspondence networks in one module,
with the initial cross-domain match, the in-domain re-warp and the interleaved loop.

The loop is an ordinary differentiable function: under `torch.no_grad()` it is the inference of
Algorithm 1; with gradients it is the end-to-end recurrent training phase, where
only the encoder outputs and the confidence mask are detached.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from midms_cli.config import ModelConfig, SamplingConfig
from midms_cli.diffusion.ddim import ddim_reenter, ddim_sigma, predict_x0
from midms_cli.diffusion.schedule import NoiseSchedule, ddim_alpha_pairs, ddim_timesteps, q_sample
from midms_cli.matching import confidence_mask, soft_warp
from midms_cli.models.autoencoder import build_autoencoder
from midms_cli.models.correspondence import Correspondence, centre_normalize
from midms_cli.models.unet import UNetModel

# Inference precisions of the networks (MIDM.set_precision; benchmarks/bench_translate.py measures them).
PRECISIONS = ("fp32", "fp32-cl", "bf16")


def precision_layout(precision: str) -> torch.memory_format:
    """The memory layout of the networks at a precision: channels-last only where asked for, since
    it changes float32 results (oneDNN's channels-last kernels accumulate in another order)."""
    return torch.contiguous_format if precision == "fp32" else torch.channels_last

# --------------------------------------------------------------------------------------------
# Time grids


@dataclass(frozen=True)
class StepTime:
    """One DDIM step: the timestep told to the UNet, and ᾱ there and at the next (less noisy) point."""

    t: int
    a_t: Tensor  # float64 0-d
    a_prev: Tensor  # float64 0-d


@dataclass(frozen=True)
class Trajectory:
    """The noising timestep and the DDIM steps of one run over a grid."""

    t_noise: int
    steps: tuple[StepTime, ...]


def trajectory(table: Tensor, grid: Tensor, first: int, count: int, noise_offset: str) -> Trajectory:
    """`count` DDIM steps starting at index `first` of the descending grid.

    noise_offset "previous" noises the input at the grid point before the first step (the
    official code's off-by-one: t = 311 for a first step at 249); "same" at the first step's t.
    ᾱ_prev follows latent-diffusion (`ddim_alpha_pairs`): the last grid point steps to ᾱ_0.
    """
    a_t, a_prev = ddim_alpha_pairs(table, grid)
    descending = grid.flip(0).tolist()
    a_t, a_prev = a_t.flip(0), a_prev.flip(0)
    if noise_offset == "previous":
        if first < 1:
            raise ValueError("noise_offset 'previous' needs a grid point before the first step")
        t_noise = descending[first - 1]
    elif noise_offset == "same":
        t_noise = descending[first]
    else:
        raise ValueError(f"unknown noise_offset {noise_offset!r}")
    steps = tuple(StepTime(descending[i], a_t[i], a_prev[i]) for i in range(first, first + count))
    return Trajectory(int(t_noise), steps)


def interleaved_trajectory(sampling: SamplingConfig, table: Tensor) -> Trajectory:
    """The interleaved steps: the last `interleaved_steps` of the first `ddim_steps` grid points.

    Official bundle: 17-point grid for S = 16, steps at 249, 187, 125, 63, noise at 311; the
    t = 1 point is never visited. "exact" grid: 188, 126, 63, 1.
    """
    grid = ddim_timesteps(sampling.ddim_steps, table.shape[0], sampling.grid).to(table.device)
    first = sampling.ddim_steps - sampling.interleaved_steps
    return trajectory(table, grid, first, sampling.interleaved_steps, sampling.noise_offset)


def refinement_trajectory(sampling: SamplingConfig, table: Tensor) -> Trajectory:
    """The refinement: from index `refine_start_index` to the end of the refine grid.

    Official: 200-point grid [996, ..., 1], noise at 101, 20 steps 96, 91, ..., 1.
    """
    grid = ddim_timesteps(sampling.refine_grid_steps, table.shape[0], sampling.grid).to(table.device)
    first = sampling.refine_start_index
    return trajectory(table, grid, first, grid.numel() - first, sampling.noise_offset)


# --------------------------------------------------------------------------------------------
# Intermediate results


@dataclass
class ConditionFeatures:
    """The condition side of the match: c↓ (B, nc, h, w), D_x = SegEnc(c↓), f_x (centred, normalised)."""

    condition: Tensor
    features: Tensor
    matching: Tensor


@dataclass
class ExemplarFeatures:
    """An image latent's side of the match: z (detached), D = RealEnc(z), f = φ(Trunk([D, c↓])).

    Computed once per exemplar and reused by every step and by every condition of a batch.
    """

    latent: Tensor
    features: Tensor
    matching: Tensor

    def expand(self, batch: int) -> ExemplarFeatures:
        """Broadcast a single exemplar to `batch` conditions (views, no recomputation)."""
        if self.latent.shape[0] == batch:
            return self
        if self.latent.shape[0] != 1:
            raise ValueError(f"cannot pair {self.latent.shape[0]} exemplars with {batch} conditions")
        return ExemplarFeatures(
            *(t.expand(batch, *t.shape[1:]) for t in (self.latent, self.features, self.matching))
        )


@dataclass
class Rewarp:
    """One in-domain re-match: warp R_k, mask M_k, and the matched features F, G."""

    warped: Tensor
    mask: Tensor
    query: Tensor  # F = n(IterEnc(x̂0, D_x))
    key: Tensor  # G = n(RealEnc(z_y))


@dataclass
class LoopStep:
    """What one interleaved step saw and produced."""

    position: int
    t: int
    x0_pred: Tensor  # the UNet's x0-prediction at this step
    rewarp: Rewarp | None = None  # the re-warp that preceded the step, if any
    x0_used: Tensor | None = None  # the (masked) x0 the trajectory was re-entered with


@dataclass
class LoopResult:
    x0: Tensor  # final x0-prediction (latent)
    steps: list[LoopStep] = field(default_factory=list)
    t_noise: int = 0


# --------------------------------------------------------------------------------------------
# The model


class MIDM(nn.Module):
    """first_stage (frozen), unet (ε_θ) and correspondence, built from one ModelConfig."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.first_stage = build_autoencoder(config.autoencoder)
        self.first_stage.requires_grad_(False)
        self.first_stage.eval()
        self.unet = UNetModel(config.unet)
        self.correspondence = Correspondence(config.correspondence, config.latent_channels)
        # ᾱ in float64, moved with the module but not saved (the config rebuilds it).
        schedule = NoiseSchedule(config.diffusion)
        self.register_buffer("alphas_cumprod", schedule.alphas_cumprod, persistent=False)
        self.precision = "fp32"  # set_precision changes it

    def train(self, mode: bool = True) -> MIDM:
        """The first stage stays in eval mode: it is frozen in every phase."""
        super().train(mode)
        self.first_stage.eval()
        return self

    def set_precision(self, precision: str) -> MIDM:
        """Inference precision of the networks, in place; returns self.

        "fp32": float32 in the plain (contiguous) memory layout the models are built and trained
        in, which is also latent-diffusion's: results equal the model as built. "fp32-cl": float32
        with both networks in channels-last layout, whose oneDNN kernels sum in another order (about
        twice the first stage's float32 rounding error against a float64 reference; faster only on
        some loaded machines, benchmarks/README.md). "bf16": the UNet in bfloat16 (96% of a
        paper-scale translation's FLOPs; the output image moves by ~0.01/255) while the first stage
        stays float32 (its rounding would reach the image directly, ~1/255), both channels-last.
        The networks take and return float32, so the sampler's arithmetic, the matching and the
        vector quantisation stay float32.
        """
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
        for network in ("first_stage", "unet"):
            self.lay_out(network)
        return self

    def lay_out(self, network: str) -> None:
        """One network ("first_stage", "unet"; the correspondence networks stay float32 and
        contiguous) in the dtype and layout of this model's precision, in place."""
        if network == "first_stage":
            self.first_stage.to(dtype=torch.float32, memory_format=precision_layout(self.precision))
        elif network == "unet":
            self.prepare_unet(self.unet)

    def prepare_unet(self, unet: nn.Module) -> nn.Module:
        """A UNet (the model's own, or a refiner's) in the dtype and layout of this model's precision."""
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        return unet.to(dtype=dtype, memory_format=precision_layout(self.precision))

    def set_activation_checkpointing(self, enabled: bool) -> MIDM:
        """Recompute activations in the backward pass instead of storing them: each UNet block of
        the unrolled loop and each block of the frozen decoder at full image size (same gradients).
        At paper scale, batch 1, these are the two largest stores of an end-to-end step
        (benchmarks/bench_train.py). The re-warps are not recomputed: their spectrally normalised
        convolutions take a power-iteration step in every training forward, so a recomputation
        would update the normalisation twice and differentiate another weight."""
        self.unet.activation_checkpointing = enabled
        self.first_stage.decoder.activation_checkpointing = enabled
        return self

    @property
    def device(self) -> torch.device:
        """Where the model computes: its noise schedule's device, which stays while the weights of
        a network are released (`models.model_file.StagedWeights`)."""
        return self.alphas_cumprod.device

    def modules_to_save(self) -> dict[str, nn.Module]:
        """Prefix -> submodule, the layout of a model file (kind "midms")."""
        return {"first_stage": self.first_stage, "unet": self.unet, "correspondence": self.correspondence}

    # -- first stage -------------------------------------------------------------------------

    def encode(self, image: Tensor) -> Tensor:
        """z = E(image), detached (no gradient reaches the first stage): VQ pre-quantisation latent
        or KL posterior mode/sample."""
        with torch.no_grad():
            return self.first_stage.encode(image).detach()

    def decode(self, latent: Tensor) -> Tensor:
        """Image = D(z) (VQ: quantise with straight-through first); differentiable, weights frozen."""
        return self.first_stage.decode(latent)

    def to_latent_grid(self, condition: Tensor, latent_size: tuple[int, int] | None = None) -> Tensor:
        """Resize a condition map to the latent grid (the condition is not VQ-encoded):
        nearest (official) or area, as `correspondence.condition_resize` says.

        Without `latent_size`, the grid of an image of the condition's size (H / f, W / f).
        """
        factor = self.config.autoencoder.downsample
        size = latent_size or (condition.shape[-2] // factor, condition.shape[-1] // factor)
        if self.config.correspondence.condition_resize == "area":
            return F.adaptive_avg_pool2d(condition, size)
        return F.interpolate(condition, size=size, mode="nearest")

    # -- matching ----------------------------------------------------------------------------

    def condition_features(self, condition: Tensor) -> ConditionFeatures:
        """c↓, D_x and f_x for a condition map at any resolution."""
        cond = self.to_latent_grid(condition)
        features = self.correspondence.condition_features(cond)
        return ConditionFeatures(cond, features, self.correspondence.condition_matching(features, cond))

    def latent_features(self, latent: Tensor, condition: Tensor) -> ExemplarFeatures:
        """z, D = RealEnc(z) and f = φ(Trunk([D, c↓])) for a latent and its own condition map."""
        cond = self.to_latent_grid(condition, tuple(latent.shape[-2:]))
        features = self.correspondence.latent_features(latent)
        return ExemplarFeatures(latent, features, self.correspondence.latent_matching(features, cond))

    def encode_exemplar(self, image: Tensor, condition: Tensor) -> ExemplarFeatures:
        """z_y = E(y), D_y and f_y from the exemplar photo and its own condition c_y."""
        return self.latent_features(self.encode(image), condition)

    def initial_match(
        self, condition: ConditionFeatures, exemplar: ExemplarFeatures, tau: float | None = None
    ) -> Tensor:
        """R0 = softwarp(z_y, corr(f_x, f_y)), the cross-domain warp of Eq. 5–6."""
        exemplar = exemplar.expand(condition.matching.shape[0])
        tau = self.config.sampling.tau if tau is None else tau
        return soft_warp(exemplar.latent, condition.matching, exemplar.matching, tau)

    def rewarp(
        self,
        x0_pred: Tensor,
        condition: ConditionFeatures,
        exemplar: ExemplarFeatures,
        sampling: SamplingConfig | None = None,
    ) -> Rewarp:
        """In-domain re-match (Eq. 8, 10): IterEnc(x̂0, D_x) against RealEnc(z_y).

        Bypasses the trunk and heads as the release does. With confidence masking off the mask is
        all ones (the new warp replaces x̂0 everywhere).
        """
        sampling = sampling or self.config.sampling
        exemplar = exemplar.expand(x0_pred.shape[0])
        query = self.correspondence.iteration_features(x0_pred, condition.features)
        key = centre_normalize(exemplar.features)
        warped = soft_warp(exemplar.latent, query, key, sampling.tau)
        if sampling.confidence_masking:
            mask = confidence_mask(
                query, key, sampling.mask_variant, sampling.mask_threshold, sampling.flow_tau
            )
        else:
            mask = torch.ones_like(warped[:, :1])
        return Rewarp(warped, mask, query, key)

    # -- diffusion ---------------------------------------------------------------------------

    def eps(self, unet: nn.Module, x: Tensor, t: int) -> Tensor:
        """ε_θ(x, t) with one timestep for the whole batch."""
        return unet(x, torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device))

    def interleaved_loop(
        self,
        warped: Tensor,
        condition: ConditionFeatures,
        exemplar: ExemplarFeatures | None,
        noise: Tensor,
        sampling: SamplingConfig | None = None,
        *,
        feed_back: bool = True,
        generator: torch.Generator | None = None,
    ) -> LoopResult:
        """Algorithm 1 steps 2–4: noise R0, then DDIM steps interleaved with re-warps.

        Step 0 noises `warped` to t_noise and denoises at t_0; at each position in
        `sampling.rewarp_positions` the previous x̂0 is re-matched and x̂0' = M⊙R + (1−M)⊙x̂0
        re-enters the trajectory (Eq. 9/11); the last step never warps. With `exemplar=None`
        nothing is re-warped; with `feed_back=False` re-warps are computed (for the cycle loss of
        the GT path in training) but not substituted. Works with or without gradients.
        """
        sampling = sampling or self.config.sampling
        plan = interleaved_trajectory(sampling, self.alphas_cumprod)
        result = LoopResult(x0=warped, t_noise=plan.t_noise)
        x = q_sample(warped, plan.t_noise, noise, self.alphas_cumprod)
        x0, eps = warped, None
        for position, step in enumerate(plan.steps):
            record = None
            if position > 0:
                if exemplar is not None and position in sampling.rewarp_positions:
                    record = self.rewarp(x0, condition, exemplar, sampling)
                    if feed_back:
                        x0 = record.mask * record.warped + (1 - record.mask) * x0
                previous = plan.steps[position - 1]
                x = self._reenter(x0, eps, previous, sampling.eta, generator)
            eps = self.eps(self.unet, x, step.t)
            used = x0
            x0 = predict_x0(x, eps, step.a_t)
            result.steps.append(LoopStep(position, step.t, x0, record, used))
        result.x0 = x0
        return result

    def _reenter(
        self, x0: Tensor, eps: Tensor, step: StepTime, eta: float, generator: torch.Generator | None
    ) -> Tensor:
        """Eq. 4 with a given x0: back onto the trajectory at the point after `step`."""
        sigma = ddim_sigma(step.a_t, step.a_prev, eta)
        noise = None
        if eta > 0:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return ddim_reenter(x0, eps, step.a_prev, sigma, noise)

    def denoise(
        self,
        unet: nn.Module,
        x0: Tensor,
        plan: Trajectory,
        noise: Tensor,
        eta: float,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Plain DDIM from q_sample(x0, t_noise) along `plan`; returns the last x0-prediction."""
        x = q_sample(x0, plan.t_noise, noise, self.alphas_cumprod)
        for index, step in enumerate(plan.steps):
            eps = self.eps(unet, x, step.t)
            x0 = predict_x0(x, eps, step.a_t)
            if index < len(plan.steps) - 1:  # the output is the last x0-prediction, not x_prev
                x = self._reenter(x0, eps, step, eta, generator)
        return x0
