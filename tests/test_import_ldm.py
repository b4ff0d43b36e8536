"""`midms weights import-ldm`: latent-diffusion checkpoints (built here in the original key layout, with
tiny configs and random values) map key for key both ways, and every mismatch is one clear error."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml

from midms_cli.checkpoint import load_checkpoint
from midms_cli.cli.app import main
from midms_cli.ldm_import import LdmConfigs, build_modules, expected_shapes, ldm_configs, load_ldm
from midms_cli.models import ldm_layout
from midms_cli.models.ldm_layout import from_ldm_state_dict, to_ldm_state_dict
from midms_cli.presets import preset

DDCONFIG = {
    "double_z": False,
    "z_channels": 3,
    "resolution": 16,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
}
UNET = {
    "image_size": 8,
    "in_channels": 3,
    "out_channels": 3,
    "model_channels": 32,
    "attention_resolutions": [2],
    "num_res_blocks": 1,
    "channel_mult": [1, 2],
    "num_head_channels": 16,
    "use_checkpoint": True,
}


def ldm_yaml() -> dict:
    """A LatentDiffusion config.yaml in the layout of latent-diffusion's configs/latent-diffusion/*.yaml."""
    return {
        "model": {
            "base_learning_rate": 2.0e-06,
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": {
                "linear_start": 0.0015,
                "linear_end": 0.0195,
                "num_timesteps_cond": 1,
                "log_every_t": 200,
                "timesteps": 1000,
                "first_stage_key": "image",
                "image_size": 8,
                "channels": 3,
                "monitor": "val/loss",
                "unet_config": {
                    "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                    "params": dict(UNET),
                },
                "first_stage_config": {
                    "target": "ldm.models.autoencoder.VQModelInterface",
                    "params": {
                        "embed_dim": 3,
                        "ckpt_path": "models/first_stage_models/vq-f4/model.ckpt",
                        "n_embed": 16,
                        "ddconfig": dict(DDCONFIG),
                        "lossconfig": {"target": "torch.nn.Identity"},
                    },
                },
                "cond_stage_config": "__is_unconditional__",
            },
        }
    }


def first_stage_yaml() -> dict:
    return {
        "model": {
            "base_learning_rate": 4.5e-06,
            "target": "ldm.models.autoencoder.VQModel",
            "params": {
                "embed_dim": 3,
                "n_embed": 16,
                "monitor": "val/rec_loss",
                "ddconfig": dict(DDCONFIG),
                "lossconfig": {
                    "target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                    "params": {"disc_conditional": False},
                },
            },
        }
    }


def random_state(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator) for k, v in module.state_dict().items()}


def original_ldm_state(configs: LdmConfigs, with_ema: bool = True) -> dict[str, torch.Tensor]:
    """A LatentDiffusion checkpoint's state dict, its key names spelled out here independently."""
    modules = build_modules(configs)
    state = {}
    for name, value in random_state(modules["first_stage"], 1).items():
        state["first_stage_model." + name] = value
    for name, value in random_state(modules["unet"], 2).items():
        state["model.diffusion_model." + name] = value
    if with_ema:
        for name, value in random_state(modules["unet"], 3).items():
            # LitEma registers one buffer per parameter, named without dots.
            state["model_ema.diffusion_model" + name.replace(".", "")] = value
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.num_updates"] = torch.tensor(1234, dtype=torch.int32)
    betas = torch.linspace(0.0015**0.5, 0.0195**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    state.update(
        {
            "betas": betas.float(),
            "alphas_cumprod": alphas_cumprod.float(),
            "alphas_cumprod_prev": torch.cat([torch.ones(1), alphas_cumprod[:-1].float()]),
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt().float(),
            "posterior_variance": betas.float(),
            "logvar": torch.zeros(1000),
        }
    )
    return state


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIDMS_HOME", str(tmp_path / "home"))


def write_inputs(tmp_path, config: dict, state: dict) -> tuple:
    config_path, ckpt_path = tmp_path / "config.yaml", tmp_path / "model.ckpt"
    config_path.write_text(yaml.safe_dump(config))
    # The original files are Lightning checkpoints: the weights under "state_dict" beside counters.
    torch.save({"state_dict": state, "global_step": 5, "epoch": 1}, ckpt_path)
    return config_path, ckpt_path


def run(capsys, *args):
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def import_args(config_path, ckpt_path, out, *flags):
    return (
        "weights",
        "import-ldm",
        "--config",
        str(config_path),
        "--ckpt",
        str(ckpt_path),
        "--out",
        str(out),
        *flags,
    )


@pytest.fixture
def ldm(tmp_path):
    configs = ldm_configs(ldm_yaml())
    state = original_ldm_state(configs)
    return configs, state, *write_inputs(tmp_path, ldm_yaml(), state)


def test_configs_are_read_from_the_yaml():
    configs = ldm_configs(ldm_yaml())
    assert configs.autoencoder.kind == "vq" and configs.autoencoder.n_embed == 16
    assert configs.autoencoder.ch_mult == (1, 2) and configs.autoencoder.scale_factor == 1.0
    assert configs.unet.model_channels == 32 and configs.unet.num_head_channels == 16
    assert configs.unet.num_heads == -1  # openaimodel's default when the YAML sets head channels
    assert configs.diffusion.linear_end == 0.0195 and configs.diffusion.timesteps == 1000


@pytest.mark.parametrize("ema", [False, True])
def test_import_picks_ema_or_regular_unet_weights(ldm, tmp_path, capsys, ema):
    configs, state, config_path, ckpt_path = ldm
    out = tmp_path / "ldm.safetensors"
    code, _, err = run(capsys, *import_args(config_path, ckpt_path, out, "--ema" if ema else "--no-ema"))
    assert code == 0, err
    ckpt = load_checkpoint(out, expected_kind="ldm")
    assert ckpt.metadata["config"]["unet"]["model_channels"] == 32
    assert ckpt.metadata["source"]["ema"] is ema
    for name, value in ckpt.tensors.items():
        prefix, _, rest = name.partition(".")
        if prefix == "first_stage":
            source = "first_stage_model." + rest
        else:
            source = (
                "model_ema.diffusion_model" + rest.replace(".", "")
                if ema
                else "model.diffusion_model." + rest
            )
        assert torch.equal(value, state[source]), name
    loaded_configs, modules = load_ldm(out)
    assert loaded_configs.to_dict() == configs.to_dict()
    assert torch.equal(modules["unet"].out[2].weight, ckpt.tensors["unet.out.2.weight"])


def test_default_is_the_regular_weights(ldm, tmp_path, capsys):
    _, state, config_path, ckpt_path = ldm
    out = tmp_path / "ldm.safetensors"
    assert run(capsys, *import_args(config_path, ckpt_path, out))[0] == 0
    tensors = load_checkpoint(out).tensors
    assert torch.equal(
        tensors["unet.input_blocks.0.0.weight"], state["model.diffusion_model.input_blocks.0.0.weight"]
    )


def test_maps_all_keys_both_ways(ldm):
    configs, state, _, _ = ldm
    expected = expected_shapes(configs)
    ours = from_ldm_state_dict(state, expected, "ldm", ema=False)
    assert set(ours) == set(expected)
    back = to_ldm_state_dict(ours)
    weight_keys = {k for k in state if k.startswith(("first_stage_model.", "model.diffusion_model."))}
    assert set(back) == weight_keys
    assert all(torch.equal(back[k], state[k]) for k in back)
    again = from_ldm_state_dict(back, expected, "ldm")
    assert all(torch.equal(again[k], ours[k]) for k in ours)
    with_ema = to_ldm_state_dict(ours, include_ema=True)
    ema_keys = {k for k in state if k.startswith("model_ema.diffusion_model")}
    assert set(with_ema) == weight_keys | ema_keys
    from_ema = from_ldm_state_dict(with_ema, expected, "ldm", ema=True)
    assert all(torch.equal(from_ema[k], ours[k]) for k in ours)


def test_first_stage_checkpoint_imports_and_drops_the_loss(tmp_path, capsys):
    configs = ldm_configs(first_stage_yaml())
    assert configs.layout == "first-stage"
    state = random_state(build_modules(configs)["first_stage"], 5)
    original = dict(state)
    original["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)
    original["loss.logvar"] = torch.zeros(())
    config_path, ckpt_path = write_inputs(tmp_path, first_stage_yaml(), original)
    out = tmp_path / "vq.safetensors"
    code, _, err = run(capsys, *import_args(config_path, ckpt_path, out))
    assert code == 0, err
    tensors = load_checkpoint(out).tensors
    assert set(tensors) == {"first_stage." + k for k in state}
    assert all(torch.equal(tensors["first_stage." + k], v) for k, v in state.items())
    ours = {"first_stage." + k: v for k, v in state.items()}
    assert set(to_ldm_state_dict(ours, layout="first-stage")) == set(state)
    # --ema makes no sense without a UNet
    code, _, err = run(capsys, *import_args(config_path, ckpt_path, tmp_path / "x.safetensors", "--ema"))
    assert code == 2 and "first-stage" in err


def expect_error(capsys, tmp_path, config, state, *needles, flags=()):
    config_path, ckpt_path = write_inputs(tmp_path, config, state)
    out = tmp_path / "out.safetensors"
    code, stdout, err = run(capsys, *import_args(config_path, ckpt_path, out, *flags))
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    assert not out.exists()  # nothing half-written


def test_missing_key_is_named(ldm, tmp_path, capsys):
    _, state, _, _ = ldm
    del state["model.diffusion_model.middle_block.1.qkv.weight"]
    expect_error(
        capsys, tmp_path, ldm_yaml(), state, "model.diffusion_model.middle_block.1.qkv.weight", "missing"
    )


def test_extra_key_is_named(ldm, tmp_path, capsys):
    _, state, _, _ = ldm
    state["first_stage_model.encoder.extra.weight"] = torch.zeros(1)
    expect_error(capsys, tmp_path, ldm_yaml(), state, "first_stage_model.encoder.extra.weight", "unexpected")


@pytest.mark.parametrize(
    "key", ["model.diffusion_model.bogus.weight", "model_ema.diffusion_modelbogusweight"]
)
def test_extra_unet_key_is_named_in_the_unused_copy_too(ldm, tmp_path, capsys, key):
    _, state, _, _ = ldm
    state[key] = torch.zeros(1)
    expect_error(capsys, tmp_path, ldm_yaml(), state, key, "unexpected")


def test_shape_mismatch_is_named(ldm, tmp_path, capsys):
    _, state, _, _ = ldm
    state["first_stage_model.quantize.embedding.weight"] = torch.zeros(32, 3)
    expect_error(
        capsys,
        tmp_path,
        ldm_yaml(),
        state,
        "first_stage_model.quantize.embedding.weight",
        "(32, 3)",
        "(16, 3)",
    )


def test_config_of_another_model_is_caught(ldm, tmp_path, capsys):
    _, state, _, _ = ldm
    config = ldm_yaml()
    config["model"]["params"]["unet_config"]["params"]["model_channels"] = 64
    expect_error(capsys, tmp_path, config, state, "model.diffusion_model.", "shape")
    config = ldm_yaml()
    config["model"]["params"]["linear_end"] = 0.012
    expect_error(capsys, tmp_path, config, state, "betas")


def test_ema_requested_but_absent(tmp_path, capsys):
    configs = ldm_configs(ldm_yaml())
    state = original_ldm_state(configs, with_ema=False)
    expect_error(
        capsys, tmp_path, ldm_yaml(), state, "--no-ema", "model_ema.diffusion_model", flags=("--ema",)
    )


def test_unsupported_unet_options_are_refused(ldm, tmp_path, capsys):
    _, state, _, _ = ldm
    config = ldm_yaml()
    config["model"]["params"]["unet_config"]["params"]["use_new_attention_order"] = True
    expect_error(capsys, tmp_path, config, state, "use_new_attention_order")
    config = ldm_yaml()
    config["model"]["params"]["cond_stage_config"] = {"target": "ldm.modules.encoders.modules.ClassEmbedder"}
    expect_error(capsys, tmp_path, config, state, "conditional")


def test_layout_helpers():
    assert ldm_layout.ema_key("input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"
    assert ldm_layout.original_key("unet.out.2.weight") == "model.diffusion_model.out.2.weight"
    assert ldm_layout.original_key("first_stage.quant_conv.bias", "first-stage") == "quant_conv.bias"


def test_cli_subprocess_reports_one_line(tmp_path):
    config_path = tmp_path / "config.yaml"
    config_path.write_text("model: [unclosed\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "midms_cli",
            *import_args(config_path, tmp_path / "none.ckpt", tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        env={"MIDMS_HOME": str(tmp_path / "home"), "PATH": ""},
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "YAML" in result.stderr


def test_kl_ldm_takes_the_learned_scale_factor(tmp_path, capsys):
    config = ldm_yaml()
    params = config["model"]["params"]
    params["scale_by_std"] = True
    params["first_stage_config"] = {
        "target": "ldm.models.autoencoder.AutoencoderKL",
        "params": {"embed_dim": 4, "ddconfig": {**DDCONFIG, "double_z": True, "z_channels": 4}},
    }
    params["unet_config"]["params"].update(
        in_channels=4, out_channels=4, num_heads=2, use_scale_shift_norm=True, resblock_updown=True
    )
    del params["unet_config"]["params"]["num_head_channels"]
    configs = ldm_configs(config)
    assert configs.autoencoder.kind == "kl" and configs.autoencoder.posterior == "sample"
    assert configs.unet.num_heads == 2 and configs.unet.num_head_channels == -1
    state = original_ldm_state(configs, with_ema=False)
    state["scale_factor"] = torch.tensor(0.22)
    config_path, ckpt_path = write_inputs(tmp_path, config, state)
    out = tmp_path / "kl.safetensors"
    code, _, err = run(capsys, *import_args(config_path, ckpt_path, out))
    assert code == 0, err
    loaded, modules = load_ldm(out)
    assert loaded.autoencoder.scale_factor == pytest.approx(0.22)
    assert torch.equal(modules["first_stage"].quant_conv.weight, state["first_stage_model.quant_conv.weight"])


CELEBA256_YAML = """
model:
  base_learning_rate: 2.0e-06
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.0015
    linear_end: 0.0195
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: image
    image_size: 64
    channels: 3
    monitor: val/loss_simple_ema
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 64
        in_channels: 3
        out_channels: 3
        model_channels: 224
        attention_resolutions: [8, 4, 2]
        num_res_blocks: 2
        channel_mult: [1, 2, 3, 4]
        num_head_channels: 32
    first_stage_config:
      target: ldm.models.autoencoder.VQModelInterface
      params:
        embed_dim: 3
        n_embed: 8192
        ckpt_path: models/first_stage_models/vq-f4/model.ckpt
        ddconfig: {double_z: false, z_channels: 3, resolution: 256, in_channels: 3, out_ch: 3, ch: 128,
                   ch_mult: [1, 2, 4], num_res_blocks: 2, attn_resolutions: [], dropout: 0.0}
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config: __is_unconditional__
"""


def test_the_released_celeba256_config_gives_the_paper_preset():
    # The layout of latent-diffusion's configs/latent-diffusion/celebahq-ldm-vq-4.yaml (spec 1.2).
    configs = ldm_configs(yaml.safe_load(CELEBA256_YAML))
    paper = preset("paper-celebahq")
    assert configs.unet == paper.unet
    assert configs.autoencoder == paper.autoencoder
    assert configs.diffusion == paper.diffusion
    shapes = expected_shapes(configs)
    assert sum(s.numel() for k, s in shapes.items() if k.startswith("unet.")) == 274_056_163


def test_a_yaml_whose_top_level_is_first_stage_config_imports_as_a_first_stage(tmp_path, capsys):
    section = ldm_yaml()["model"]["params"]["first_stage_config"]  # VQModelInterface + params
    configs = ldm_configs(first_stage_yaml())
    state = random_state(build_modules(configs)["first_stage"], 6)
    config_path, ckpt_path = write_inputs(tmp_path, {"first_stage_config": section}, state)
    out = tmp_path / "vq.safetensors"
    code, _, err = run(capsys, *import_args(config_path, ckpt_path, out))
    assert code == 0, err
    loaded, modules = load_ldm(out)
    assert loaded.unet is None and loaded.autoencoder == configs.autoencoder
    assert torch.equal(modules["first_stage"].quant_conv.weight, state["quant_conv.weight"])
    # Neither section: one line naming both.
    expect_error(capsys, tmp_path, {"first_stage": section}, state, "`model:`", "`first_stage_config:`")
