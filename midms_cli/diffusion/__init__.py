"""Diffusion mathematics: the noise schedule and time grids (schedule) and the DDIM step (ddim)."""

from midms_cli.diffusion.ddim import ddim_reenter, ddim_sigma, ddim_step, predict_x0
from midms_cli.diffusion.schedule import (
    NoiseSchedule,
    alphas_cumprod,
    ddim_alpha_pairs,
    ddim_timesteps,
    linear_betas,
    q_sample,
)

__all__ = [
    "NoiseSchedule",
    "alphas_cumprod",
    "ddim_alpha_pairs",
    "ddim_reenter",
    "ddim_sigma",
    "ddim_step",
    "ddim_timesteps",
    "linear_betas",
    "predict_x0",
    "q_sample",
]
