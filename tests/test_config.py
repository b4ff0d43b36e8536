"""Presets carry the spec's constants; configs round-trip through JSON; bad values name the field."""

from __future__ import annotations

import json

import pytest

from midms_cli.config import ModelConfig, apply_sampling_variant
from midms_cli.errors import ConfigError
from midms_cli.presets import PRESETS, preset

# The official values, copied from midms-spec.md (section in brackets), not from config.py.
CELEBAHQ_AUTOENCODER = {  # [1.2] LDM VQ-f4
    "kind": "vq", "embed_dim": 3, "n_embed": 8192, "z_channels": 3, "ch": 128, "ch_mult": (1, 2, 4),
    "num_res_blocks": 2, "attn_resolutions": (), "dropout": 0.0, "resolution": 256, "scale_factor": 1.0,
}
CELEBAHQ_UNET = {  # [1.2] LDM celeba256
    "image_size": 64, "in_channels": 3, "out_channels": 3, "model_channels": 224,
    "channel_mult": (1, 2, 3, 4), "num_res_blocks": 2, "attention_resolutions": (8, 4, 2),
    "num_head_channels": 32,
    "use_scale_shift_norm": False, "resblock_updown": False,
}
CELEBAHQ_DIFFUSION = {  # [1.2]
    "timesteps": 1000, "beta_schedule": "linear", "linear_start": 0.0015, "linear_end": 0.0195,
}
CORRESPONDENCE = {  # [1.4] N_CH 256, SPADE hidden 128, 4 trunk blocks, stem 64 -> 256 -> 512
    "channels": 256, "spade_hidden": 128, "trunk_blocks": 4, "stem_channels": (64, 256, 512),
}
SAMPLING = {  # [1.6, 1.7, 1.9, 1.11, appendix A]
    "ddim_steps": 16, "interleaved_steps": 4, "rewarp_positions": (1, 2), "eta": 0.0, "tau": 0.005,
    "flow_tau": 0.005, "mask_threshold": 0.5, "confidence_masking": True, "refine_grid_steps": 200,
    "refine_start_index": 180, "refine_eta": 1.0, "refine": "finetuned", "variant": "official",
    "grid": "official", "noise_offset": "previous", "mask_variant": "official",
}
LOSSES = {  # [2.3]
    "domain": 10.0, "cycle": 1.0, "warmup_cycle_twice": True, "source_vgg": 1.0,
    "source_vgg_layers": ("r12", "r22", "r32", "r42", "r52"),
    "source_vgg_weights": (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0),
    "perceptual": 0.002, "perceptual_layer": "r42", "contextual": 1.0,
    "contextual_layers": ("r52", "r42", "r32", "r22"), "contextual_weights": (8.0, 4.0, 2.0, 1.0),
    "contextual_pool": (1, 1, 2, 4), "contextual_h": 0.1, "contextual_mode": "wta", "contextual_wta": 0.3,
    "diffusion": 1.0, "diffusion_space": "x0", "segmentation": 0.0,
}
TRAINING = {  # [2.4]
    "batch_size": 1, "lr_correspondence": 3e-6, "lr_unet": 3e-6, "weight_decay": 0.05, "betas": (0.9, 0.999),
    "milestones": (10, 12, 14, 24), "gamma": 0.3, "warmup_iters": 10_000, "epochs": 4, "seed": 2021,
    "grad_clip": 0.0, "ema_decay": 0.0, "amp": False,
}


def _assert_fields(obj, expected: dict, where: str) -> None:
    for name, value in expected.items():
        assert getattr(obj, name) == value, f"{where}.{name}: {getattr(obj, name)!r} != spec {value!r}"


def _assert_common(config: ModelConfig) -> None:
    _assert_fields(config.sampling, SAMPLING, "sampling")
    _assert_fields(config.training, TRAINING, "training")
    _assert_fields(config.correspondence, CORRESPONDENCE, "correspondence")
    assert config.image_size == 256


def test_paper_celebahq_matches_the_spec():
    config = preset("paper-celebahq")
    _assert_common(config)
    _assert_fields(config.autoencoder, CELEBAHQ_AUTOENCODER, "autoencoder")
    _assert_fields(config.unet, CELEBAHQ_UNET, "unet")
    _assert_fields(config.diffusion, CELEBAHQ_DIFFUSION, "diffusion")
    _assert_fields(config.training.losses, LOSSES, "losses")
    assert config.condition == "celebahq-edges" and config.correspondence.cond_channels == 15
    assert (config.latent_channels, config.latent_size) == (3, 64)  # latent 3x64x64 [1.1]
    assert (config.training.load_size, config.training.flip) == (286, True)  # [3.1] resize 286, crop 256


def test_paper_deepfashion_matches_the_spec():
    config = preset("paper-deepfashion")
    _assert_common(config)
    _assert_fields(config.autoencoder, CELEBAHQ_AUTOENCODER, "autoencoder")  # VQ-f4 per the appendix
    _assert_fields(config.unet, CELEBAHQ_UNET, "unet")
    _assert_fields(config.diffusion, CELEBAHQ_DIFFUSION, "diffusion")
    _assert_fields(config.training.losses, LOSSES, "losses")
    assert config.condition == "openpose" and config.correspondence.cond_channels == 20
    assert (config.training.load_size, config.training.flip) == (0, True)  # [3.1] 256 loaded: flips only


def test_paper_lsun_matches_the_spec():
    config = preset("paper-lsun")
    _assert_common(config)
    _assert_fields(config.autoencoder, {  # [1.2] KL-f8, encode(x).sample(), scale factor ignored
        "kind": "kl", "embed_dim": 4, "z_channels": 4, "double_z": True, "ch_mult": (1, 2, 4, 4),
        "posterior": "sample", "scale_factor": 1.0,
    }, "autoencoder")
    assert config.autoencoder.downsample == 8 and (config.latent_channels, config.latent_size) == (4, 32)
    _assert_fields(config.unet, {
        "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 192,
        "channel_mult": (1, 2, 2, 4, 4), "attention_resolutions": (1, 2, 4, 8), "num_heads": 8,
        "use_scale_shift_norm": True, "resblock_updown": True,
    }, "unet")
    _assert_fields(config.diffusion, {**CELEBAHQ_DIFFUSION, "linear_end": 0.0155}, "diffusion")
    lsun_losses = {**LOSSES, "perceptual": 0.05, "perceptual_layer": "r52", "segmentation": 100.0}
    _assert_fields(config.training.losses, lsun_losses, "losses")
    assert config.condition == "ade20k" and config.correspondence.cond_channels == 151  # 150 + 1
    assert (config.training.load_size, config.training.flip) == (286, True)


def test_tiny_preset_is_small_and_consistent():
    config = preset("tiny")
    assert config.image_size == 64 and config.latent_size == 16 and config.unet.image_size == 16
    assert config.training.seed == 2021


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_json(name):
    config = preset(name)
    text = config.to_json()
    again = ModelConfig.from_json(text)
    assert again == config  # dataclass equality: tuples must come back as tuples
    assert again.to_json() == text
    assert json.loads(text)["name"] == name


def test_preset_returns_fresh_copies_and_refuses_unknown_names():
    first = preset("tiny")
    first.sampling.tau = 1.0
    assert preset("tiny").sampling.tau == 0.005
    with pytest.raises(ConfigError, match="unknown preset 'huge'; choose one of: tiny"):
        preset("huge")


def test_sampling_bundles_set_the_quirk_fields_together():
    corrected = apply_sampling_variant(preset("paper-celebahq").sampling, "corrected")
    assert (corrected.variant, corrected.grid, corrected.noise_offset, corrected.mask_variant) == (
        "corrected", "exact", "same", "cycle")
    assert corrected.tau == 0.005  # non-quirk fields untouched
    with pytest.raises(ConfigError, match="sampling.variant: 'best' is not one of official, corrected"):
        apply_sampling_variant(corrected, "best")


def _with(path: str, value) -> dict:
    data = preset("tiny").to_dict()
    node = data
    *parents, leaf = path.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    return data


@pytest.mark.parametrize(
    "data,message",
    [
        ({"bogus": 1}, "bogus: unknown field; allowed fields: autoencoder, condition"),
        ({"sampling": {"bogus": 1}}, "sampling.bogus: unknown field"),
        ({"training": {"losses": {"bogus": 1}}}, "training.losses.bogus: unknown field"),
        ({"sampling": {"tau": "hot"}}, "sampling.tau: expected a number, got 'hot'"),
        ({"unet": {"num_res_blocks": True}}, "unet.num_res_blocks: expected an integer, got True"),
        ({"unet": {"num_res_blocks": 1.5}}, "unet.num_res_blocks: expected an integer, got 1.5"),
        ({"sampling": {"confidence_masking": "yes"}}, "sampling.confidence_masking: expected true or false"),
        ({"training": {"milestones": [1, "a"]}}, "training.milestones: expected an integer, got 'a'"),
        ({"training": {"betas": [0.9]}}, "training.betas: expected 2 values, got 1"),
        ({"sampling": "fast"}, "sampling: expected an object, got str"),
        ({"sampling": {"grid": "weird"}}, "sampling.grid: 'weird' is not one of official, exact"),
        ({"correspondence": {"condition_resize": "bilinear"}},
         "correspondence.condition_resize: 'bilinear' is not one of nearest, area"),
        ({"condition": "sketch"}, "condition: 'sketch' is not one of celebahq-edges"),
        ({"training": {"losses": {"perceptual_layer": "r99"}}}, "training.losses.perceptual_layer: 'r99'"),
        (_with("sampling.interleaved_steps", 40), "sampling.interleaved_steps: must be between 1 and"),
        (_with("unet.in_channels", 4), "unet.in_channels: must equal autoencoder.embed_dim 8"),
        (_with("training.load_size", 60),
         "training.load_size: must be 0 (no resize) or at least image_size (64)"),
        # The official grid's last point would index past the 1000-entry schedule above 500 steps.
        (_with("sampling.ddim_steps", 501), "sampling.ddim_steps: must be between 2 and 500 with the"),
        (_with("sampling.refine_grid_steps", 1000), "sampling.refine_grid_steps: must be between 2 and 500"),
    ],
)
def test_invalid_config_names_the_field_in_one_line(data, message):
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict(data)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_invalid_json_text_is_one_config_error():
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json('{"name": ')
    with pytest.raises(ConfigError, match="must be an object"):
        ModelConfig.from_json("[1, 2]")
