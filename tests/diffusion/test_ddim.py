"""DDIM pieces against a direct implementation of the DDIM update written here."""

import math

import pytest
import torch

from midms_cli.diffusion.ddim import ddim_reenter, ddim_sigma, ddim_step, predict_x0
from midms_cli.diffusion.schedule import NoiseSchedule


def reference_ddim(x_t, eps, a_t, a_prev, sigma, noise):
    """Song et al. 2021, Eq. 12, written out with python floats."""
    x0 = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps + sigma * noise, x0


@pytest.fixture
def schedule():
    return NoiseSchedule()


def test_eta_0_step_matches_the_ddim_equation(schedule):
    torch.manual_seed(0)
    x_t, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    a_t, a_prev = schedule.alpha(249).item(), schedule.alpha(187).item()
    x_prev, x0 = ddim_step(x_t, eps, a_t, a_prev, eta=0.0)
    ref_prev, ref_x0 = reference_ddim(x_t, eps, a_t, a_prev, 0.0, 0.0)
    assert torch.allclose(x_prev, ref_prev, atol=1e-5) and torch.allclose(x0, ref_x0, atol=1e-5)


def test_eta_1_step_matches_the_equation_with_the_given_noise(schedule):
    torch.manual_seed(1)
    x_t, eps, noise = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)
    a_t, a_prev = schedule.alpha(96).item(), schedule.alpha(91).item()
    sigma = math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
    x_prev, _ = ddim_step(x_t, eps, a_t, a_prev, eta=1.0, noise=noise)
    assert torch.allclose(x_prev, reference_ddim(x_t, eps, a_t, a_prev, sigma, noise)[0], atol=1e-5)


def test_per_sample_alphas_broadcast_over_the_batch(schedule):
    torch.manual_seed(2)
    x_t, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    grid = schedule.grid(16)
    a_t, a_prev = schedule.alpha_pairs(grid)
    x_prev, _ = ddim_step(x_t, eps, a_t[[4, 1]], a_prev[[4, 1]])
    for i, index in enumerate([4, 1]):
        ref, _ = reference_ddim(x_t[i], eps[i], a_t[index].item(), a_prev[index].item(), 0.0, 0.0)
        assert torch.allclose(x_prev[i], ref, atol=1e-5)


def test_predict_x0_inverts_q_sample(schedule):
    torch.manual_seed(3)
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    x_t = schedule.q_sample(x0, 311, noise)
    assert torch.allclose(predict_x0(x_t, noise, schedule.alpha(311)), x0, atol=1e-5)


def test_reentering_with_the_unchanged_x0_reproduces_the_plain_step(schedule):
    torch.manual_seed(4)
    x_t, eps, noise = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    a_t, a_prev = schedule.alpha(187), schedule.alpha(125)
    for eta in (0.0, 1.0):
        x_prev, x0 = ddim_step(x_t, eps, a_t, a_prev, eta=eta, noise=noise)
        again = ddim_reenter(x0, eps, a_prev, ddim_sigma(a_t, a_prev, eta), noise)
        assert torch.equal(again, x_prev)


def test_reentering_with_a_substituted_x0_is_equation_9(schedule):
    torch.manual_seed(5)
    warped, eps = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    a_prev = schedule.alpha(125).item()
    expected = math.sqrt(a_prev) * warped + math.sqrt(1 - a_prev) * eps
    assert torch.allclose(ddim_reenter(warped, eps, a_prev), expected, atol=1e-6)


def test_refinement_sigma_at_96_with_previous_91_is_the_spec_value(schedule):
    # spec 1.11: "sigma at t=96 ~ 0.104"; the pair (96 -> 91) gives 0.1044, (101 -> 96) would give 0.1057.
    sigma = ddim_sigma(schedule.alpha(96), schedule.alpha(91), 1.0)
    assert sigma.item() == pytest.approx(0.104, abs=5e-4)
    assert ddim_sigma(schedule.alpha(96), schedule.alpha(91), 0.0).item() == 0.0


def test_half_precision_latents_keep_their_dtype(schedule):
    x_t = torch.randn(1, 3, 4, 4, dtype=torch.bfloat16)
    x_prev, x0 = ddim_step(x_t, torch.randn_like(x_t), schedule.alpha(63), schedule.alpha(1))
    assert x_prev.dtype == torch.bfloat16 and x0.dtype == torch.bfloat16


def test_deterministic_ddim_with_the_true_noise_recovers_x0_along_the_whole_grid(schedule):
    torch.manual_seed(6)
    x0, noise = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    grid = schedule.grid(16)
    a_t, a_prev = schedule.alpha_pairs(grid)
    x = schedule.q_sample(x0, grid[-1], noise)
    for index in reversed(range(len(grid))):
        # the exact noise of the current point, as a perfect denoiser would predict it
        eps = (x - a_t[index].sqrt() * x0) / (1 - a_t[index]).sqrt()
        x, x0_pred = ddim_step(x, eps, a_t[index], a_prev[index])
        assert torch.allclose(x0_pred, x0, atol=1e-9)
    assert torch.allclose(x, schedule.q_sample(x0, 0, noise), atol=1e-9)
