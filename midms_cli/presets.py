"""Named configurations: the paper presets with the official release's values, and `tiny`, a 64 px
model that trains on a CPU in minutes."""

from __future__ import annotations

from midms_cli.config import (
    AutoencoderConfig,
    CorrespondenceConfig,
    DiffusionConfig,
    LossConfig,
    ModelConfig,
    TrainingConfig,
    UNetConfig,
    validate,
)
from midms_cli.errors import ConfigError


def _official_augmentation(config: ModelConfig, load_size: int) -> ModelConfig:
    """The official augmentation: resize to `load_size` (0: keep the stored 256), crop 256 at random, flip."""
    config.training.load_size, config.training.flip = load_size, True
    return config


def _paper_celebahq() -> ModelConfig:
    return _official_augmentation(ModelConfig(), 286)


def _paper_deepfashion() -> ModelConfig:
    # VQ-f4 as for CelebA (paper appendix); no LDM exists for DeepFashion, users pretrain one.
    config = ModelConfig(name="paper-deepfashion", condition="openpose")
    config.correspondence.cond_channels = 20
    return _official_augmentation(config, 0)  # 256 stored, 256 loaded: flips only


def _paper_lsun() -> ModelConfig:
    config = ModelConfig(
        name="paper-lsun",
        condition="ade20k",
        autoencoder=AutoencoderConfig(
            kind="kl", embed_dim=4, z_channels=4, double_z=True, n_embed=0, ch_mult=(1, 2, 4, 4),
            posterior="sample",
        ),
        unet=UNetConfig(
            image_size=32,
            in_channels=4,
            out_channels=4,
            model_channels=192,
            attention_resolutions=(1, 2, 4, 8),
            channel_mult=(1, 2, 2, 4, 4),
            num_heads=8,
            num_head_channels=-1,
            use_scale_shift_norm=True,
            resblock_updown=True,
        ),
        diffusion=DiffusionConfig(linear_end=0.0155),
        correspondence=CorrespondenceConfig(cond_channels=151),
    )
    config.training.losses.perceptual = 0.05
    config.training.losses.perceptual_layer = "r52"
    config.training.losses.segmentation = 100.0
    return _official_augmentation(config, 286)


def _tiny() -> ModelConfig:
    """64 px images, 16x16 latents, narrow nets: trains on a laptop CPU in minutes."""
    config = ModelConfig(
        name="tiny",
        image_size=64,
        # LDM's KL-f4 layout: trained from scratch at this width it learns several times faster
        # than the VQ-f4 first stage (measured on synthfaces, see CHANGELOG). 8 latent channels
        # instead of KL-f4's 3: 20.3 against 17.7 dB validation PSNR after 700 steps on synthfaces.
        autoencoder=AutoencoderConfig(
            kind="kl", double_z=True, embed_dim=8, z_channels=8, resolution=64, ch=32, ch_mult=(1, 2, 4),
            num_res_blocks=1,
        ),
        unet=UNetConfig(
            image_size=16,
            in_channels=8,
            out_channels=8,
            model_channels=32,
            num_res_blocks=1,
            attention_resolutions=(2,),
            channel_mult=(1, 2, 2),
            num_heads=-1,
            num_head_channels=16,
        ),
        # Area resize: at f = 4 nearest keeps 1 of 16 pixels of a one-pixel edge map. On synthfaces
        # "hard" pairs the warm-up's decoded warp reached 18.2 dB oracle PSNR with area, 17.0 with nearest.
        correspondence=CorrespondenceConfig(
            channels=32, stem_channels=(16, 32, 64), trunk_blocks=2, spade_hidden=32, condition_resize="area"
        ),
    )
    config.training = TrainingConfig(
        batch_size=8,
        # 1e-3: on synthfaces 300 warm-up steps gave a decoded warp of 16.3 dB oracle PSNR against
        # 14.5 with 2e-4 (15.6 after 600 steps); the matches are still far from converged at this budget.
        lr_correspondence=1e-3,
        # At 1e-3 the end-to-end phase took the warm-up's decoded warp from 19.4 to 13.9 dB in 100
        # steps on synthfaces. At 1e-4 it still cost 0.12 dB (21.05 to 20.93 on 48 tuning pairs, one
        # interleaved step at 1/32) and the output 0.11 dB; at 1e-5 the warp keeps 21.04.
        lr_correspondence_e2e=1e-5,
        lr_unet=2e-5,
        warmup_iters=200,
        max_iters=400,
        milestones=(),
        log_every=10,
        checkpoint_every=100,
        sample_every=100,
        seed=2021,
        # The official resize-and-crop at its ratio (286 / 256 ~ 72 / 64), the exemplar with its
        # own window, and flips. Without it the matches learn position instead of content: on 48
        # synthfaces pairs 98 % of a 600-step warm-up's matches were the identity and its decoded warp
        # scored 20.47 dB oracle PSNR (exemplar copied: 20.59); with it, after 900 steps, 86 % and 20.74.
        load_size=72,
        flip=True,
        # Perceptual weight 1 instead of 0.002: the first-stage features are weaker than VGG's. After
        # 300 augmented warm-up steps the decoded warp scored 19.45 against 18.99 dB with 0.002.
        losses=LossConfig(feature_net="first-stage", perceptual=1.0),
    )
    return config


PRESETS = {
    "tiny": _tiny,
    "paper-celebahq": _paper_celebahq,
    "paper-deepfashion": _paper_deepfashion,
    "paper-lsun": _paper_lsun,
}


def preset(name: str) -> ModelConfig:
    """A fresh copy of a named preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    config = PRESETS[name]()
    validate(config)
    return config
