"""The DDPM noise schedule of the pretrained latent diffusion model and the DDIM time grids.

Tables are float64 (as in latent-diffusion) and are cast to the latent's dtype only where they are
used, so a float16/bfloat16 latent never carries a rounded schedule. Timesteps index the tables
0-based: ᾱ_t is `alphas_cumprod[t]`, the convention of the official code.
"""

from __future__ import annotations

import torch
from torch import Tensor

from midms_cli.config import DiffusionConfig
from midms_cli.errors import ConfigError

GRIDS = ("official", "exact")


def linear_betas(timesteps: int, start: float, end: float) -> Tensor:
    """LDM's "linear" schedule: β = linspace(√start, √end, T)², in float64 (latent-diffusion).

    Note the squares: the schedule is linear in √β, not in β as in DDPM.
    """
    return torch.linspace(start**0.5, end**0.5, timesteps, dtype=torch.float64) ** 2


def alphas_cumprod(betas: Tensor) -> Tensor:
    """ᾱ_t = Π_{s≤t} (1 − β_s), the signal fraction of Eq. 1."""
    return torch.cumprod(1.0 - betas.to(torch.float64), dim=0)


def ddim_timesteps(num_steps: int, timesteps: int = 1000, grid: str = "official") -> Tensor:
    """The ascending DDIM sub-sequence of DDPM timesteps, as the official code builds it.

    "official": latent-diffusion's "uniform" grid, arange(0, T, T // S) + 1. When S does not
    divide T it has more than S points: 17 for S = 16 ([1, 63, ..., 993]); for S = 200 it is the
    refinement grid [1, 6, ..., 996].
    "exact": exactly S points, floor(i·T / S) + 1 for i = 0..S−1 — evenly spaced to within one
    timestep, and identical to "official" whenever S divides T.
    """
    if grid not in GRIDS:
        raise ConfigError(f"unknown DDIM grid {grid!r}; choose one of: {', '.join(GRIDS)}")
    # The "+ 1" shift puts the last point past the table (index T) when the stride is 1, so the
    # official grid takes at most T // 2 steps and the exact one at most T - 1.
    most = timesteps // 2 if grid == "official" else timesteps - 1
    if num_steps < 1 or num_steps > most:
        raise ConfigError(
            f"ddim steps must be between 1 and {most} for the {grid} grid of {timesteps} timesteps, "
            f"got {num_steps}; choose fewer steps"
        )
    if grid == "official":
        return torch.arange(0, timesteps, timesteps // num_steps, dtype=torch.long) + 1
    return torch.arange(num_steps, dtype=torch.long) * timesteps // num_steps + 1


def ddim_alpha_pairs(table: Tensor, grid: Tensor) -> tuple[Tensor, Tensor]:
    """(ᾱ_t, ᾱ_prev) for every point of an ascending grid, as latent-diffusion's DDIM sampler.

    ᾱ_prev of grid point i is ᾱ at grid point i − 1; the first point steps to ᾱ_0 (the table's
    first entry, not 1), exactly as the official code.
    """
    a_t = table[grid]
    a_prev = torch.cat([table[:1], table[grid[:-1]]])
    return a_t, a_prev


def broadcast_to(values: Tensor | float, x: Tensor) -> Tensor:
    """Per-sample coefficients (a number, 0-d or (B,)) as x's dtype/device, shaped (B, 1, ..., 1)."""
    values = torch.as_tensor(values, device=x.device)
    if values.ndim == 1:
        values = values.reshape(-1, *([1] * (x.ndim - 1)))
    return values.to(x.dtype)


def q_sample(x0: Tensor, t: Tensor | int, noise: Tensor, table: Tensor) -> Tensor:
    """Eq. 1, the forward process: z_t = √ᾱ_t·z_0 + √(1 − ᾱ_t)·ε (code `q_sample`).

    `t` is one timestep or one per sample (B,); `table` is alphas_cumprod (float64).
    """
    t = torch.as_tensor(t, device=table.device)
    a_t = table[t]
    return broadcast_to(a_t.sqrt(), x0) * x0 + broadcast_to((1.0 - a_t).sqrt(), x0) * noise


class NoiseSchedule:
    """β_t and ᾱ_t of a DiffusionConfig as float64 tensors, with lookups by timestep."""

    def __init__(self, config: DiffusionConfig | None = None):
        self.config = config or DiffusionConfig()
        if self.config.beta_schedule != "linear":
            raise ConfigError(
                f"unknown beta_schedule {self.config.beta_schedule!r}; only 'linear' is supported"
            )
        self.timesteps = self.config.timesteps
        self.betas = linear_betas(self.timesteps, self.config.linear_start, self.config.linear_end)
        self.alphas_cumprod = alphas_cumprod(self.betas)

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """Move the tables to `device` (they stay float64) and return self."""
        self.betas = self.betas.to(device)
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    def alpha(self, t: Tensor | int) -> Tensor:
        """ᾱ_t (float64) for one timestep or a tensor of them."""
        return self.alphas_cumprod[torch.as_tensor(t, device=self.device)]

    def q_sample(self, x0: Tensor, t: Tensor | int, noise: Tensor) -> Tensor:
        """Eq. 1 with this schedule."""
        return q_sample(x0, t, noise, self.alphas_cumprod)

    def grid(self, num_steps: int, grid: str = "official") -> Tensor:
        """The ascending DDIM grid on this schedule's device."""
        return ddim_timesteps(num_steps, self.timesteps, grid).to(self.device)

    def alpha_pairs(self, grid: Tensor) -> tuple[Tensor, Tensor]:
        """(ᾱ_t, ᾱ_prev) along an ascending grid (see `ddim_alpha_pairs`)."""
        return ddim_alpha_pairs(self.alphas_cumprod, grid.to(self.device))
