"""DDIM in its paper's pieces: the x0-prediction, the step, and re-entering the trajectory.

`a_t` and `a_prev` are ᾱ values: numbers, 0-d tensors or one per sample (B,). Coefficients are
computed in float64 and cast to the latent's dtype where they multiply it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from midms_cli.diffusion.schedule import broadcast_to


def _float64(value: Tensor | float) -> Tensor:
    return torch.as_tensor(value, dtype=torch.float64)


def predict_x0(x_t: Tensor, eps: Tensor, a_t: Tensor | float) -> Tensor:
    """Eq. 3: f_θ(z_t, t) = (z_t − √(1 − ᾱ_t)·ε_θ) / √ᾱ_t."""
    a_t = _float64(a_t).to(x_t.device)
    return (x_t - broadcast_to((1.0 - a_t).sqrt(), x_t) * eps) / broadcast_to(a_t.sqrt(), x_t)


def ddim_sigma(a_t: Tensor | float, a_prev: Tensor | float, eta: float) -> Tensor:
    """σ_t = η·√((1 − ᾱ_prev)/(1 − ᾱ_t))·√(1 − ᾱ_t/ᾱ_prev) (Eq. 2/4 of the DDIM paper), float64.

    η = 0 gives deterministic DDIM; η = 1 the DDPM posterior variance (the refinement;
    its "σ at t = 96 ≈ 0.104" is the step 96 → 91: 0.1044, whereas 101 → 96 would give 0.1057).
    """
    a_t, a_prev = _float64(a_t), _float64(a_prev)
    return eta * ((1.0 - a_prev) / (1.0 - a_t)).sqrt() * (1.0 - a_t / a_prev).sqrt()


def ddim_reenter(
    x0: Tensor,
    eps: Tensor,
    a_prev: Tensor | float,
    sigma: Tensor | float = 0.0,
    noise: Tensor | None = None,
) -> Tensor:
    """Eq. 4 from a given x0, i.e. Eq. 9/11: re-enter the trajectory with a substituted x0.

    z_prev = √ᾱ_prev·x0 + √(1 − ᾱ_prev − σ²)·ε_θ + σ·ε. With x0 = f_θ(z_t, t) this is the plain
    DDIM step; MIDMs puts the (masked) warped exemplar latent in its place and keeps the stored
    direction √(1 − ᾱ_prev)·ε_θ. ε is drawn from torch's generator when σ > 0
    and no `noise` is given.
    """
    a_prev = _float64(a_prev).to(x0.device)
    sigma = _float64(sigma).to(x0.device)
    x_prev = broadcast_to(a_prev.sqrt(), x0) * x0 + broadcast_to((1.0 - a_prev - sigma**2).sqrt(), x0) * eps
    if bool((sigma != 0).any()):
        noise = torch.randn_like(x0) if noise is None else noise
        x_prev = x_prev + broadcast_to(sigma, x0) * noise
    return x_prev


def ddim_step(
    x_t: Tensor,
    eps: Tensor,
    a_t: Tensor | float,
    a_prev: Tensor | float,
    eta: float = 0.0,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Eq. 4, one DDIM step from t to the previous grid point: returns (z_prev, x0-prediction)."""
    x0_pred = predict_x0(x_t, eps, a_t)
    sigma = ddim_sigma(a_t, a_prev, eta)
    return ddim_reenter(x0_pred, eps, a_prev, sigma, noise), x0_pred
