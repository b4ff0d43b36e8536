"""The entries the official MIDMs module adds to its state dict besides the networks.

The official code keeps its DDIM samplers (latent-diffusion's `DDIMSampler`) as `nn.Module`
attributes of the MIDMs module, each holding the latent diffusion model as `.model`. PyTorch's
`state_dict()` walks every attribute path, so the one LDM appears again as
`diffusion_sampler.model.*` and, after `set_copy()`, as `copied_diffusion_sampler.model.*` (that
sampler wraps `diff_model` too). Each call of the sampler (`make_schedule`) registers float32
buffers on it: the DDPM tables and the `ddim_*` values of the last step count S and η used.

None of these carry information of their own. `without_sampler_entries` checks that every repeat
equals the tensor it repeats and every buffer equals the schedule, then drops them; any other key
under a sampler prefix is refused by name.
"""

from __future__ import annotations

import torch
from torch import Tensor

from midms_cli.config import DiffusionConfig
from midms_cli.diffusion.schedule import alphas_cumprod, ddim_timesteps, linear_betas
from midms_cli.errors import MidmsError

SAMPLER_PREFIXES = ("diffusion_sampler.", "copied_diffusion_sampler.")
MODEL_PREFIX = "diff_model."
# make_schedule's DDPM tables (length T) and its DDIM values (length of the S-step grid, except the
# last one, which has length T).
TABLE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
)
DDIM_BUFFERS = (
    "ddim_sigmas",
    "ddim_alphas",
    "ddim_alphas_prev",
    "ddim_sqrt_one_minus_alphas",
    "ddim_sigmas_for_original_num_steps",
)
# The buffers are float32 computations; float32 rounding (and a GPU's log) stays far inside this,
# while another schedule, step count or η moves them by percent.
RTOL, ATOL = 1e-4, 1e-6


def table_buffers(diffusion: DiffusionConfig) -> dict[str, Tensor]:
    """The DDPM tables as the official sampler registers them: float32, derived from float32 ᾱ."""
    betas = linear_betas(diffusion.timesteps, diffusion.linear_start, diffusion.linear_end)
    table = alphas_cumprod(betas)
    a = table.float()
    a_prev = torch.cat([torch.ones(1, dtype=torch.float64), table[:-1]]).float()
    return {
        "betas": betas.float(),
        "alphas_cumprod": a,
        "alphas_cumprod_prev": a_prev,
        "sqrt_alphas_cumprod": a.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - a).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - a).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / a).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / a - 1.0).sqrt(),
    }


def ddim_buffers(diffusion: DiffusionConfig, num_steps: int, eta: float) -> dict[str, Tensor]:
    """The `ddim_*` buffers of make_schedule(S = num_steps, η = eta) on latent-diffusion's uniform grid."""
    tables = table_buffers(diffusion)
    a, a_prev_table = tables["alphas_cumprod"], tables["alphas_cumprod_prev"]
    grid = ddim_timesteps(num_steps, diffusion.timesteps, "official")
    a_t = a[grid]
    a_prev = torch.cat([a[:1], a[grid[:-1]]])
    return {
        "ddim_sigmas": eta * ((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)).sqrt(),
        "ddim_alphas": a_t,
        "ddim_alphas_prev": a_prev,
        "ddim_sqrt_one_minus_alphas": (1.0 - a_t).sqrt(),
        "ddim_sigmas_for_original_num_steps": eta
        * ((1.0 - a_prev_table) / (1.0 - a) * (1.0 - a / a_prev_table)).sqrt(),
    }


def _close(stored: Tensor, expected: Tensor) -> bool:
    return stored.shape == expected.shape and torch.allclose(
        stored.double(), expected.double(), rtol=RTOL, atol=ATOL
    )


def step_count(diffusion: DiffusionConfig, stored_alphas: Tensor) -> int | None:
    """The S whose official DDIM grid gives these ᾱ values, or None.

    The grid depends on S only through the stride T // S, so one S per stride is tried.
    """
    a = table_buffers(diffusion)["alphas_cumprod"]
    tried = set()
    for num_steps in range(1, diffusion.timesteps // 2 + 1):
        stride = diffusion.timesteps // num_steps
        if stride in tried:
            continue
        tried.add(stride)
        grid = ddim_timesteps(num_steps, diffusion.timesteps, "official")
        if len(grid) == len(stored_alphas) and _close(stored_alphas, a[grid]):
            return num_steps
    return None


def check_sampler_buffers(prefix: str, buffers: dict[str, Tensor], diffusion: DiffusionConfig) -> None:
    """Every buffer of one sampler must be the LDM's schedule (and one consistent S, η)."""
    where = f"the LDM's schedule (timesteps {diffusion.timesteps}, linear_start {diffusion.linear_start}, "
    where += f"linear_end {diffusion.linear_end}); pass the LDM the model was fine-tuned from"
    for name, expected in table_buffers(diffusion).items():
        if name in buffers and not _close(buffers[name], expected):
            raise MidmsError(f"checkpoint buffer {prefix + name!r} is not {where}")
    present = [name for name in DDIM_BUFFERS if name in buffers]
    if not present:
        return
    if len(present) != len(DDIM_BUFFERS):
        missing = next(name for name in DDIM_BUFFERS if name not in buffers)
        raise MidmsError(f"checkpoint has {prefix + present[0]!r} but not {prefix + missing!r}: "
                         "the sampler's buffers are incomplete")
    num_steps = step_count(diffusion, buffers["ddim_alphas"])
    if num_steps is None:
        raise MidmsError(f"checkpoint buffer {prefix}ddim_alphas is no DDIM grid of {where}")
    unit = ddim_buffers(diffusion, num_steps, 1.0)["ddim_sigmas"]
    stored_sigmas = buffers["ddim_sigmas"].double()
    eta = float(stored_sigmas[unit.argmax()] / unit.double().max())
    for name, expected in ddim_buffers(diffusion, num_steps, eta).items():
        if not _close(buffers[name], expected):
            raise MidmsError(
                f"checkpoint buffer {prefix + name!r} is not the DDIM value for S = {num_steps}, "
                f"eta = {eta:.3g} of {where}"
            )


def without_sampler_entries(state: dict[str, Tensor], diffusion: DiffusionConfig) -> dict[str, Tensor]:
    """`state` without the samplers' repeats of the LDM and their schedule buffers (all checked first)."""
    kept: dict[str, Tensor] = {}
    buffers: dict[str, dict[str, Tensor]] = {prefix: {} for prefix in SAMPLER_PREFIXES}
    for key, tensor in state.items():
        prefix = next((p for p in SAMPLER_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            kept[key] = tensor
            continue
        name = key[len(prefix) :]
        if name.startswith("model."):
            original = MODEL_PREFIX + name[len("model.") :]
            if original not in state:
                raise MidmsError(f"checkpoint key {key!r} repeats {original!r}, which the checkpoint lacks")
            same = tensor.dtype == state[original].dtype and tensor.shape == state[original].shape
            if not (same and torch.equal(tensor, state[original])):
                raise MidmsError(
                    f"checkpoint tensor {key!r} differs from {original!r}, the tensor it repeats: "
                    "the checkpoint is inconsistent (edited or saved from another model)"
                )
        elif name in TABLE_BUFFERS or name in DDIM_BUFFERS:
            buffers[prefix][name] = tensor
        else:
            raise MidmsError(
                f"unexpected key {key!r}: the official sampler holds only the LDM (model.*) and its "
                f"schedule buffers ({', '.join(TABLE_BUFFERS + DDIM_BUFFERS)})"
            )
    for prefix, found in buffers.items():
        check_sampler_buffers(prefix, found, diffusion)
    return kept
