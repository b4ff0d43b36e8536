"""The official noise order: the official forward's random stream replayed, and injected noise.

`official_stream` below replays the random calls of the official MIDMs inference forward in its
own control flow (the loop over t_list, DDIMSampler.one_step_sample per chain, the extra
diffusion-loss step at np.random.randint, then DDIMSampler.sample for the refinement) on torch's
and numpy's global generators, independently of midms_cli.sampler.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from midms_cli.errors import MidmsError
from midms_cli.models.midm import MIDM
from midms_cli.presets import preset
from midms_cli.sampler import InjectedNoise, OfficialNoiseOrder, translate


def micro_config():
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


def inputs(batch):
    generator = torch.Generator().manual_seed(1)
    condition = torch.rand(batch, 15, 32, 32, generator=generator)
    return condition, torch.rand(1, 3, 32, 32, generator=generator) * 2 - 1, torch.rand(1, 15, 32, 32)


def official_stream(seed, shape, loop_steps=4, refine_steps=20):
    """[(role, tensor)] of the official inference forward's draws, seeded as torch.manual_seed(seed)
    and np.random.seed(seed) just before it."""
    torch_state, numpy_state = torch.random.get_rng_state(), np.random.get_state()
    draws = []
    try:
        torch.manual_seed(seed)
        np.random.seed(seed)
        t_list = np.sort(np.random.choice(loop_steps, loop_steps, replace=False)) + 3 * loop_steps
        rand_idx = np.random.randint(0, len(t_list))
        latent = torch.zeros(shape)

        def one_step_sample(chain, ddim_param_is_none):
            draws.append(("discarded", torch.randn(shape)))  # one_step_ddim_sampling's img
            if ddim_param_is_none:
                draws.append((f"{chain} q", torch.randn_like(latent)))  # q_sample's noise
            draws.append((f"{chain} p", torch.randn(shape)))  # p_sample_ddim's noise_like

        for idx, _ in enumerate(t_list):
            one_step_sample("ref", idx == 0)
            one_step_sample("src", idx == 0)
            if idx == rand_idx:
                one_step_sample("extra", True)
        draws.append(("discarded", torch.randn(shape)))  # ddim_sampling's img
        draws.append(("refine q", torch.randn_like(latent)))
        for _ in range(refine_steps):
            draws.append(("refine p", torch.randn(shape)))
    finally:
        torch.random.set_rng_state(torch_state)
        np.random.set_state(numpy_state)
    return draws


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("seed", [0, 7])
def test_the_official_order_takes_the_official_draws(model, batch, seed):
    condition, exemplar, exemplar_condition = inputs(batch)
    result = translate(model, condition, exemplar, exemplar_condition, noise=OfficialNoiseOrder(seed))
    shape = tuple(result.initial_warp.shape)  # (B, latent channels, 8, 8)
    assert shape[0] == batch
    official = official_stream(seed, shape)
    assert len(result.noise.draws) == len(official) == 43
    assert all(drawn_shape == shape for _, drawn_shape in result.noise.draws)
    assert [role == "discarded" for role, _ in result.noise.draws] == [r == "discarded" for r, _ in official]
    by_role = {}
    for role, tensor in official:
        by_role.setdefault(role, []).append(tensor)
    assert torch.equal(result.noise.loop, by_role["ref q"][0])
    assert torch.equal(result.noise.refine, by_role["refine q"][0])
    steps = zip(result.noise.refine_steps, by_role["refine p"], strict=True)
    assert all(torch.equal(a, b) for a, b in steps)


def test_the_extra_step_moves_with_the_numpy_draw():
    positions = {OfficialNoiseOrder(seed).extra_position(4) for seed in range(12)}
    assert positions == {0, 1, 2, 3}
    np.random.seed(3)
    np.random.choice(4, 4, replace=False)
    assert OfficialNoiseOrder(3).extra_position(4) == np.random.randint(0, 4)


def test_same_seed_same_image_and_seeds_differ(model):
    condition, exemplar, exemplar_condition = inputs(2)
    runs = [
        translate(model, condition, exemplar, exemplar_condition, noise=OfficialNoiseOrder(seed))
        for seed in (5, 5, 6)
    ]
    assert torch.equal(runs[0].image, runs[1].image)
    assert not torch.equal(runs[0].image, runs[2].image)


def test_injected_noise_is_what_the_generator_path_draws(model):
    condition, exemplar, exemplar_condition = inputs(1)
    plain = translate(
        model, condition, exemplar, exemplar_condition, generator=torch.Generator().manual_seed(4)
    )
    generator = torch.Generator().manual_seed(4)
    shape = tuple(plain.initial_warp.shape)
    draw = lambda: torch.randn(shape, generator=generator)  # noqa: E731
    noise = InjectedNoise(loop=draw(), refine=draw(), refine_steps=[draw() for _ in range(19)])
    injected = translate(model, condition, exemplar, exemplar_condition, noise=noise)
    assert torch.equal(plain.image, injected.image)
    with pytest.raises(ValueError, match="step noises"):
        short = dataclasses.replace(noise, refine_steps=[])
        translate(model, condition, exemplar, exemplar_condition, noise=short)


def test_a_loop_with_eta_is_refused(model):
    condition, exemplar, exemplar_condition = inputs(1)
    sampling = dataclasses.replace(model.config.sampling, eta=0.5)
    with pytest.raises(MidmsError, match="eta 0"):
        translate(
            model, condition, exemplar, exemplar_condition, sampling=sampling, noise=OfficialNoiseOrder(0)
        )


def test_translate_cli_official_noise_order_is_reproducible(model, tmp_path, capsys):
    from PIL import Image

    from midms_cli.cli.app import main
    from midms_cli.cli.state import STATE
    from midms_cli.pipelines.translate import save_midm

    save_midm(tmp_path / "m.safetensors", model)
    channels = model.config.correspondence.cond_channels
    np.save(tmp_path / "c.npy", np.random.default_rng(0).random((channels, 32, 32)).astype(np.float32))
    pixels = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "r.png")

    def run(*extra):
        STATE.json = False
        args = ["translate", str(tmp_path / "c.npy"), str(tmp_path / "r.png"), "--ref-cond",
                str(tmp_path / "c.npy"), "--model", str(tmp_path / "m.safetensors"), *extra]
        try:
            main(args)
            code = 0
        except SystemExit as exc:
            code = exc.code
        return code, capsys.readouterr().err

    outputs = []
    for name, order in (("a.png", "official"), ("b.png", "official"), ("c.png", "midms")):
        code, err = run("-o", str(tmp_path / name), "--seed", "3", "--noise-order", order)
        assert code == 0, err
        outputs.append((tmp_path / name).read_bytes())
    assert outputs[0] == outputs[1] and outputs[0] != outputs[2]
    code, err = run("-o", str(tmp_path / "d.png"), "--noise-order", "numpy")
    assert code == 2 and "--noise-order 'numpy'" in err and len(err.strip().splitlines()) == 1
