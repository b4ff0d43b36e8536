"""Algorithm 1: call counts, timesteps, re-warp positions, determinism, reuse of exemplar features."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import midms_cli.models.midm as midm_module
from midms_cli.config import apply_sampling_variant
from midms_cli.errors import MidmsError
from midms_cli.models.midm import MIDM
from midms_cli.models.unet import UNetModel
from midms_cli.presets import preset
from midms_cli.sampler import translate


class CountingUNet(nn.Module):
    """Wraps a UNet and records the timestep of every call."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.timesteps: list[int] = []

    def forward(self, x, timesteps):
        assert bool((timesteps == timesteps[0]).all())
        self.timesteps.append(int(timesteps[0]))
        return self.inner(x, timesteps)


def micro_config():
    """The tiny preset narrowed further (32 px images, 8x8 latents): the official time grid, fast nets."""
    config = preset("tiny")
    config.image_size = 32
    config.autoencoder = dataclasses.replace(config.autoencoder, resolution=32, n_embed=16)
    config.unet = dataclasses.replace(
        config.unet, image_size=8, channel_mult=(1, 2), attention_resolutions=(2,)
    )
    config.correspondence = dataclasses.replace(
        config.correspondence, channels=16, stem_channels=(8, 16, 16), trunk_blocks=1, spade_hidden=8
    )
    return config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MIDM(micro_config()).eval()


@pytest.fixture()
def inputs():
    torch.manual_seed(1)
    return torch.rand(1, 15, 32, 32), torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 15, 32, 32)


def counting(model: MIDM) -> CountingUNet:
    model.unet = CountingUNet(model.unet)
    return model.unet


def restore(model: MIDM) -> None:
    if isinstance(model.unet, CountingUNet):
        model.unet = model.unet.inner


OFFICIAL_REFINE = list(range(96, 0, -5))


@pytest.fixture()
def noised_at(monkeypatch) -> list[int]:
    """The timesteps at which the sampler q-samples (the initial noising and the refinement's)."""
    seen: list[int] = []
    real_q_sample = midm_module.q_sample
    monkeypatch.setattr(
        midm_module,
        "q_sample",
        lambda x0, t, noise, table: (seen.append(int(t)), real_q_sample(x0, t, noise, table))[1],
    )
    return seen


def test_official_bundle_makes_4_interleaved_and_20_refinement_calls(model, inputs, noised_at):
    unet = counting(model)
    try:
        result = translate(model, *inputs, generator=torch.Generator().manual_seed(0), capture=True)
    finally:
        restore(model)
    assert unet.timesteps == [249, 187, 125, 63] + OFFICIAL_REFINE
    assert len(OFFICIAL_REFINE) == 20
    assert noised_at == [311, 101]
    assert [step.rewarp is not None for step in result.loop.steps] == [False, True, True, False]
    assert result.image.shape == (1, 3, 32, 32)
    assert float(result.image.abs().max()) <= 1.0


def test_corrected_bundle_visits_the_exact_grid_and_noises_at_the_first_step(model, inputs, noised_at):
    sampling = dataclasses.replace(apply_sampling_variant(model.config.sampling, "corrected"), refine="none")
    unet = counting(model)
    try:
        translate(model, *inputs, sampling=sampling, generator=torch.Generator().manual_seed(0))
    finally:
        restore(model)
    assert unet.timesteps == [188, 126, 63, 1]
    assert noised_at == [188]


def test_rewarp_substitutes_the_masked_warp_into_the_trajectory(model, inputs):
    result = translate(model, *inputs, generator=torch.Generator().manual_seed(0), capture=True)
    steps = result.loop.steps
    for position in (1, 2):
        rewarp = steps[position].rewarp
        expected = rewarp.mask * rewarp.warped + (1 - rewarp.mask) * steps[position - 1].x0_pred
        assert torch.equal(steps[position].x0_used, expected)
        assert set(rewarp.mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(steps[3].x0_used, steps[2].x0_pred)  # the last step does not warp


def test_same_seed_gives_the_same_image_bit_for_bit(model, inputs):
    first = translate(model, *inputs, generator=torch.Generator().manual_seed(7)).image
    second = translate(model, *inputs, generator=torch.Generator().manual_seed(7)).image
    assert torch.equal(first, second)


def test_eta_zero_loop_is_deterministic_given_the_initial_noise(model, inputs):
    condition, exemplar, exemplar_condition = inputs
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        ex = model.encode_exemplar(exemplar, exemplar_condition)
        cond = model.condition_features(condition)
        warped = model.initial_match(cond, ex)
        noise = torch.randn(warped.shape, generator=generator)
        state = generator.get_state()
        runs = [model.interleaved_loop(warped, cond, ex, noise, generator=generator).x0 for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(generator.get_state(), state)  # η = 0 draws no further noise


def test_encoder_and_decoder_run_once_and_exemplar_features_are_shared(model, monkeypatch):
    calls = {"encode": [], "decode": [], "real_enc": 0, "iter_enc": 0, "seg_enc": 0}
    encode, decode = model.first_stage.encode, model.first_stage.decode
    monkeypatch.setattr(
        model.first_stage, "encode", lambda x: (calls["encode"].append(x.shape[0]), encode(x))[1]
    )
    monkeypatch.setattr(
        model.first_stage, "decode", lambda z: (calls["decode"].append(z.shape[0]), decode(z))[1]
    )
    hooks = [
        getattr(model.correspondence, name).register_forward_hook(
            lambda *_, name=name: calls.__setitem__(name, calls[name] + 1)
        )
        for name in ("real_enc", "iter_enc", "seg_enc")
    ]
    try:
        torch.manual_seed(2)
        translate(
            model,
            torch.rand(3, 15, 32, 32),
            torch.rand(1, 3, 32, 32) * 2 - 1,
            torch.rand(1, 15, 32, 32),
            generator=torch.Generator().manual_seed(0),
        )
    finally:
        for hook in hooks:
            hook.remove()
    assert calls["encode"] == [1] and calls["decode"] == [3]
    assert calls["real_enc"] == 1  # exemplar features computed once, reused by both re-warps
    assert calls["iter_enc"] == 2 and calls["seg_enc"] == 1


def test_refiner_choice(model, inputs):
    unet = counting(model)
    pretrained = CountingUNet(UNetModel(model.config.unet).eval())
    try:
        sampling = dataclasses.replace(model.config.sampling, refine="pretrained")
        translate(model, *inputs, sampling=sampling, pretrained_unet=pretrained)
        assert len(unet.timesteps) == 4 and len(pretrained.timesteps) == 20
        with pytest.raises(MidmsError, match="pretrained"):
            translate(model, *inputs, sampling=sampling)
        unet.timesteps.clear()
        translate(model, *inputs, sampling=dataclasses.replace(sampling, refine="none"))
        assert len(unet.timesteps) == 4
    finally:
        restore(model)


def test_loop_with_gradients_reaches_unet_and_iteration_encoder(model, inputs):
    condition, exemplar, exemplar_condition = inputs
    model.train()
    try:
        ex = model.encode_exemplar(exemplar, exemplar_condition)
        cond = model.condition_features(condition)
        warped = model.initial_match(cond, ex)
        # Without masking every pixel takes the new warp, so IterEnc must receive gradient.
        sampling = dataclasses.replace(model.config.sampling, confidence_masking=False)
        loop = model.interleaved_loop(warped, cond, ex, torch.randn_like(warped), sampling)
        loop.x0.square().mean().backward()
    finally:
        model.eval()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert grads["unet.out.2.weight"] is not None
    assert any(
        g is not None and g.abs().sum() > 0
        for n, g in grads.items()
        if n.startswith("correspondence.iter_enc")
    )
    assert any(
        g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("correspondence.theta")
    )
    assert all(not p.requires_grad for p in model.first_stage.parameters())
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("resize", ["nearest", "area"])
def test_condition_reaches_the_latent_grid_by_the_configured_resize(resize):
    """Nearest keeps one pixel of each f x f cell (official, spec 5.11), area keeps the cell's mean:
    a one-pixel edge off the sampled pixels vanishes under nearest and counts 1/16 under area (f = 4)."""
    config = micro_config()
    config.correspondence = dataclasses.replace(config.correspondence, condition_resize=resize)
    model = MIDM(config)
    condition = torch.zeros(1, 2, 32, 32)
    condition[0, 0, 5, 4:8] = 1.0  # an edge along row 5 of cell (1, 1)
    condition[0, 1] = torch.arange(32.0).repeat(32, 1)  # a ramp along x
    grid = model.to_latent_grid(condition)
    assert grid.shape == (1, 2, 8, 8)
    sampled = condition[0, :, ::4, ::4]  # nearest picks the cell's top-left pixel at an integer factor
    cell_means = condition[0].reshape(2, 8, 4, 8, 4).mean(dim=(2, 4))
    expected = sampled if resize == "nearest" else cell_means
    torch.testing.assert_close(grid[0], expected)
    assert grid[0, 0, 1, 1] == (0.0 if resize == "nearest" else 4 / 16)
