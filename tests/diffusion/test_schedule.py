"""The LDM noise schedule and DDIM grids against the numbers of spec 1.6 and 1.11."""

import math

import pytest
import torch

from midms_cli.config import DiffusionConfig
from midms_cli.diffusion.schedule import (
    NoiseSchedule,
    alphas_cumprod,
    ddim_alpha_pairs,
    ddim_timesteps,
    linear_betas,
    q_sample,
)
from midms_cli.errors import MidmsError


def test_linear_betas_are_squares_of_a_linspace_of_square_roots():
    betas = linear_betas(1000, 0.0015, 0.0195)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(0.0015, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.0195, rel=1e-12)
    # linear in sqrt(beta), so the mid value is the square of the mean of the square roots
    mid = ((math.sqrt(0.0015) + math.sqrt(0.0195)) / 2) ** 2
    assert linear_betas(3, 0.0015, 0.0195)[1].item() == pytest.approx(mid, rel=1e-12)


def test_alphas_cumprod_matches_a_python_product():
    betas = linear_betas(1000, 0.0015, 0.0195)
    product = 1.0
    for beta in betas[:250].tolist():
        product *= 1.0 - beta
    assert alphas_cumprod(betas)[249].item() == pytest.approx(product, rel=1e-12)


@pytest.mark.parametrize(
    "t, expected",
    [(63, 0.8934), (125, 0.7729), (187, 0.6424), (249, 0.5105), (311, 0.3860), (101, 0.8211)],
)
def test_alphas_cumprod_equal_the_spec_table(t, expected):
    assert NoiseSchedule(DiffusionConfig()).alpha(t).item() == pytest.approx(expected, abs=1e-4)


def test_official_16_step_grid_has_the_spec_17_entries():
    expected = [1, 63, 125, 187, 249, 311, 373, 435, 497, 559, 621, 683, 745, 807, 869, 931, 993]
    grid = ddim_timesteps(16, 1000, "official")
    assert grid.dtype == torch.long
    assert grid.tolist() == expected


def test_refinement_grid_has_200_entries_from_1_to_996():
    grid = ddim_timesteps(200, 1000, "official")
    assert grid.tolist() == list(range(1, 1000, 5))
    assert len(grid) == 200 and grid[180].item() == 901 and grid[20].item() == 101


def test_exact_grid_has_exactly_s_points_and_equals_official_when_s_divides_t():
    grid = ddim_timesteps(16, 1000, "exact")
    assert len(grid) == 16
    assert grid.tolist() == [i * 1000 // 16 + 1 for i in range(16)]
    assert torch.equal(ddim_timesteps(50, 1000, "exact"), ddim_timesteps(50, 1000, "official"))


def test_bad_grid_arguments_are_user_errors():
    with pytest.raises(MidmsError, match="unknown DDIM grid"):
        ddim_timesteps(16, 1000, "bogus")
    with pytest.raises(MidmsError, match="between 1 and 500 for the official grid"):
        ddim_timesteps(0)


@pytest.mark.parametrize("grid, most", [("official", 500), ("exact", 999)])
def test_every_accepted_grid_stays_inside_the_schedule_and_one_more_step_is_refused(grid, most):
    schedule = NoiseSchedule()
    for steps in (most - 1, most):  # the densest grids: their last point must still index the table
        points = ddim_timesteps(steps, 1000, grid)
        assert points.max().item() <= 999 and len(torch.unique(points)) == len(points)
        schedule.alpha_pairs(points)
    with pytest.raises(MidmsError, match=f"between 1 and {most} for the {grid} grid"):
        ddim_timesteps(most + 1, 1000, grid)


def test_alpha_pairs_step_to_the_previous_grid_point_and_to_alpha_0_first():
    schedule = NoiseSchedule()
    grid = schedule.grid(16)
    a_t, a_prev = schedule.alpha_pairs(grid)
    table = schedule.alphas_cumprod
    # ascending grid: 249 is grid[4] (tr[12] of spec 1.6), its previous point is 187
    assert a_t[4].item() == table[249].item() and a_prev[4].item() == table[187].item()
    assert a_prev[0].item() == table[0].item()
    assert torch.equal(ddim_alpha_pairs(table, grid)[1], a_prev)


def test_q_sample_is_equation_1_per_sample_and_keeps_the_latent_dtype():
    torch.manual_seed(0)
    schedule = NoiseSchedule()
    x0 = torch.randn(2, 3, 4, 4)
    noise = torch.randn(2, 3, 4, 4)
    t = torch.tensor([311, 101])
    out = schedule.q_sample(x0, t, noise)
    for i, step in enumerate([311, 101]):
        a = schedule.alphas_cumprod[step].item()
        assert torch.allclose(out[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * noise[i], atol=1e-6)
    half = q_sample(x0.bfloat16(), 249, noise.bfloat16(), schedule.alphas_cumprod)
    assert half.dtype == torch.bfloat16


def test_schedule_tables_stay_float64_after_to():
    schedule = NoiseSchedule().to("cpu")
    assert schedule.alphas_cumprod.dtype == torch.float64 and schedule.betas.dtype == torch.float64
    assert schedule.alpha(torch.tensor([63, 249])).shape == (2,)


def test_unknown_beta_schedule_is_a_user_error():
    with pytest.raises(MidmsError, match="beta_schedule"):
        NoiseSchedule(DiffusionConfig(beta_schedule="cosine"))
