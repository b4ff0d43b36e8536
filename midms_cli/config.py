"""Typed configuration: model, diffusion, correspondence, sampling and training settings.

The defaults are the official values of the MIDMs release (named presets: `midms_cli.presets`); every
difference between the official code and the paper is one named field, and the `official` and
`corrected` sampler bundles set them together. Configs round-trip through JSON and are validated
at the edge, so an invalid value is one user error naming the field and what it allows.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any

from midms_cli.errors import ConfigError


@dataclass
class AutoencoderConfig:
    """The frozen first stage, laid out as latent-diffusion's VQModel / AutoencoderKL."""

    kind: str = "vq"  # "vq" (VQ-f4, CelebA-HQ and DeepFashion) or "kl" (KL-f8, LSUN)
    embed_dim: int = 3
    n_embed: int = 8192  # codebook size (vq only)
    z_channels: int = 3
    double_z: bool = False  # kl: the encoder outputs mean and log-variance
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    # LDM's scale factor for KL latents; MIDMs' official code ignores it.
    scale_factor: float = 1.0
    # kl: encode with the posterior mean ("mode") or a posterior sample (official: "sample").
    posterior: str = "mode"

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass
class UNetConfig:
    """The latent diffusion UNet (latent-diffusion's openaimodel.UNetModel subset)."""

    image_size: int = 64
    in_channels: int = 3
    out_channels: int = 3
    model_channels: int = 224
    num_res_blocks: int = 2
    # Downsampling factors (not pixel sizes) at which attention is applied, as in LDM's YAML.
    attention_resolutions: tuple[int, ...] = (8, 4, 2)
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_heads: int = -1
    num_head_channels: int = 32
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    dropout: float = 0.0


@dataclass
class DiffusionConfig:
    """The DDPM noise schedule of the pretrained latent diffusion model."""

    timesteps: int = 1000
    beta_schedule: str = "linear"  # LDM "linear": betas = linspace(sqrt(start), sqrt(end))**2
    linear_start: float = 0.0015
    linear_end: float = 0.0195


@dataclass
class CorrespondenceConfig:
    """The matching networks of MIDMs (condition, latent and iteration encoders, trunk, heads)."""

    cond_channels: int = 15  # condition channels: CelebA-HQ 15, DeepFashion 20, LSUN 151
    channels: int = 256  # matching feature width (official N_CH)
    stem_channels: tuple[int, int, int] = (64, 256, 512)
    trunk_blocks: int = 4
    spade_hidden: int = 128
    # How the condition map is brought to the latent grid: "nearest" (official; one pixel of each
    # f x f cell, so thin edges alias) or "area" (the mean of each cell).
    condition_resize: str = "nearest"


@dataclass
class SamplingConfig:
    """Algorithm 1: the interleaved matching + DDIM loop and the final refinement.

    The defaults are the official bundle; `corrected` fixes the official release's quirks.
    """

    variant: str = "official"  # which bundle the quirk fields below were set from
    ddim_steps: int = 16  # grid size; 1000 // 16 gives the official 17-point grid
    grid: str = "official"  # "official": arange(0, T, T // S) + 1 (17 points for S=16); "exact": S points
    interleaved_steps: int = 4  # the last steps of the grid that are run (paper: "25% noise level")
    rewarp_positions: tuple[int, ...] = (1, 2)  # loop positions that re-warp (never the last)
    # "previous": noise to the grid point before the first step (the official code's off-by-one)
    # "same": noise to the timestep the UNet is told
    noise_offset: str = "previous"
    eta: float = 0.0
    tau: float = 0.005  # warp softmax temperature (official code; the paper omits it)
    flow_tau: float = 0.005  # soft-argmax temperature of the confidence flows
    confidence_masking: bool = True
    # "official": forward flow sampled at the forward-mapped point (official); "cycle": forward-backward
    mask_variant: str = "official"
    mask_threshold: float = 0.5  # in [-1, 1] normalised coordinates
    # Refinement: which UNet, on which grid, from where.
    refine: str = "finetuned"  # "finetuned" (official code), "pretrained" (paper), "none"
    refine_grid_steps: int = 200
    refine_start_index: int = 180  # hijack step: noise at grid[index] (t = 101 officially)
    refine_eta: float = 1.0


SAMPLING_BUNDLES: dict[str, dict[str, Any]] = {
    "official": {
        "variant": "official", "grid": "official", "noise_offset": "previous", "mask_variant": "official"
    },
    "corrected": {"variant": "corrected", "grid": "exact", "noise_offset": "same", "mask_variant": "cycle"},
}


@dataclass
class LossConfig:
    """Loss weights and layer choices of the training losses (official values)."""

    domain: float = 10.0
    cycle: float = 1.0
    warmup_cycle_twice: bool = True  # official: the initial cycle loss counts twice in warm-up
    source_vgg: float = 1.0
    source_vgg_layers: tuple[str, ...] = ("r12", "r22", "r32", "r42", "r52")
    source_vgg_weights: tuple[float, ...] = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)
    perceptual: float = 0.002  # LSUN: 0.05
    perceptual_layer: str = "r42"  # LSUN: r52
    contextual: float = 1.0
    contextual_layers: tuple[str, ...] = ("r52", "r42", "r32", "r22")
    contextual_weights: tuple[float, ...] = (8.0, 4.0, 2.0, 1.0)
    contextual_pool: tuple[int, ...] = (1, 1, 2, 4)
    contextual_h: float = 0.1
    contextual_mode: str = "wta"  # "wta": official MIDMs (keep max >= 0.3); "cocosnet"
    contextual_wta: float = 0.3
    diffusion: float = 1.0
    diffusion_space: str = "x0"  # "x0": official code; "eps": the paper's Eq. 17
    segmentation: float = 0.0  # LSUN warped-segmentation loss: 100
    feature_net: str = "vgg19"  # "vgg19" (needs weights) or "first-stage" (no external weights)


@dataclass
class TrainingConfig:
    """Optimiser, schedule and phase control of warm-up and end-to-end training."""

    batch_size: int = 1
    lr_correspondence: float = 3e-6
    lr_correspondence_e2e: float = 0.0  # end-to-end phase; 0: lr_correspondence (official: one rate)
    lr_unet: float = 3e-6  # paper: 1.5e-7
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    milestones: tuple[int, ...] = (10, 12, 14, 24)  # epochs
    gamma: float = 0.3
    warmup_iters: int = 10_000
    warmup_epochs: int = 0  # > 0: warm up for this many epochs instead (the paper's "first 2 epochs")
    max_iters: int = 0  # 0: run `epochs` epochs
    epochs: int = 4
    grad_accumulation: int = 1
    # The official augmentation of the warm-up and end-to-end batches: resize to load_size, crop back to
    # image_size at a random window (the exemplar draws its own), flip with p = 0.5. 0: no resize.
    load_size: int = 0
    flip: bool = False
    # The exemplar window of a self pair: "shared" with the target (official: the identity is its
    # exact match) or "own" (a crop and flip of its own draw, so that no pair rewards matching by
    # position alone).
    self_pair_window: str = "shared"
    grad_clip: float = 0.0  # 0: no clipping (official)
    ema_decay: float = 0.0  # 0: no EMA (official)
    amp: bool = False
    activation_checkpointing: bool = False
    nan_patience: int = 10  # stop after this many non-finite losses in a row
    seed: int = 2021
    log_every: int = 10
    checkpoint_every: int = 1000
    sample_every: int = 500
    keep_checkpoints: int = 3
    losses: LossConfig = field(default_factory=LossConfig)


@dataclass
class ModelConfig:
    """Everything that rebuilds a MIDMs model and its default sampler from a checkpoint alone."""

    name: str = "paper-celebahq"
    image_size: int = 256
    condition: str = "celebahq-edges"  # condition kind: celebahq-edges, canny, openpose, ade20k
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    correspondence: CorrespondenceConfig = field(default_factory=CorrespondenceConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.autoencoder.downsample

    @property
    def latent_channels(self) -> int:
        return self.autoencoder.embed_dim

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        config = from_dict(cls, data, "config")
        validate(config)
        return config

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, dict):
            raise ConfigError("config JSON must be an object")
        return cls.from_dict(data)


def rewarp_positions_within(positions: tuple[int, ...], steps: int) -> tuple[int, ...]:
    """The re-warp positions that fit a loop of `steps` interleaved steps: 1 .. steps - 2 (the first
    step uses the initial warp, the last never re-warps)."""
    return tuple(p for p in positions if 0 < p < steps - 1)


def apply_sampling_variant(sampling: SamplingConfig, variant: str) -> SamplingConfig:
    """A copy of `sampling` with every quirk field set from the named bundle."""
    if variant not in SAMPLING_BUNDLES:
        raise ConfigError(f"sampling.variant: {variant!r} is not one of {', '.join(SAMPLING_BUNDLES)}")
    return dataclasses.replace(sampling, **SAMPLING_BUNDLES[variant])


# --------------------------------------------------------------------------------------------
# JSON round-trip


def to_dict(obj: Any) -> Any:
    """Dataclasses to plain JSON-ready dicts; tuples become lists."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(x) for x in obj]
    return obj


def from_dict(cls: type, data: Any, path: str) -> Any:
    """Rebuild dataclass `cls` from `data`, naming the offending field on any mismatch."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    prefix = "" if path == "config" else f"{path}."  # top-level fields are named without a prefix
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown field; allowed fields: {', '.join(sorted(names))}")
    values = {}
    for name, value in data.items():
        values[name] = _convert(hints[name], value, prefix + name)
    return cls(**values)


def _convert(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, path) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}")
        return tuple(_convert(a, v, path) for a, v in zip(args, value, strict=True))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


# --------------------------------------------------------------------------------------------
# Validation

_CHOICES: dict[str, tuple[str, ...]] = {
    "condition": ("celebahq-edges", "canny", "openpose", "ade20k"),
    "autoencoder.kind": ("vq", "kl"),
    "autoencoder.posterior": ("mode", "sample"),
    "correspondence.condition_resize": ("nearest", "area"),
    "diffusion.beta_schedule": ("linear",),
    "sampling.variant": tuple(SAMPLING_BUNDLES),
    "sampling.grid": ("official", "exact"),
    "sampling.noise_offset": ("previous", "same"),
    "sampling.mask_variant": ("official", "cycle"),
    "sampling.refine": ("finetuned", "pretrained", "none"),
    "training.losses.contextual_mode": ("wta", "cocosnet"),
    "training.losses.diffusion_space": ("x0", "eps"),
    "training.self_pair_window": ("shared", "own"),
    "training.losses.feature_net": ("vgg19", "first-stage"),
    "training.losses.perceptual_layer": ("r12", "r22", "r32", "r42", "r52"),
}


def _get(config: ModelConfig, path: str) -> Any:
    obj: Any = config
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _require(ok: bool, path: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{path}: {message}")


def validate(config: ModelConfig) -> None:
    """Raise ConfigError naming the first invalid field and what it allows."""
    for path, choices in _CHOICES.items():
        value = _get(config, path)
        _require(value in choices, path, f"{value!r} is not one of {', '.join(choices)}")
    ae, unet, corr = config.autoencoder, config.unet, config.correspondence
    s, t = config.sampling, config.training
    _require(config.image_size > 0 and config.image_size % ae.downsample == 0, "image_size",
             f"must be a positive multiple of the autoencoder's downsampling factor {ae.downsample}")
    _require(unet.image_size == config.latent_size, "unet.image_size",
             f"must equal the latent size {config.latent_size} (image_size / {ae.downsample})")
    for field_name in ("in_channels", "out_channels"):
        _require(getattr(unet, field_name) == ae.embed_dim, f"unet.{field_name}",
                 f"must equal autoencoder.embed_dim {ae.embed_dim}")
    _require(unet.num_heads > 0 or unet.num_head_channels > 0, "unet.num_heads",
             "set num_heads or num_head_channels to a positive value")
    _require(len(ae.ch_mult) >= 1 and all(m > 0 for m in ae.ch_mult), "autoencoder.ch_mult",
             "positive integers")
    _require(ae.kind != "vq" or ae.n_embed > 0, "autoencoder.n_embed",
             "must be positive for a VQ autoencoder")
    _require(len(unet.channel_mult) >= 1 and all(m > 0 for m in unet.channel_mult), "unet.channel_mult",
             "positive integers")
    _require(corr.cond_channels > 0, "correspondence.cond_channels", "must be positive")
    _require(corr.channels > 0 and corr.trunk_blocks >= 0, "correspondence.channels", "must be positive")
    _require(0.0 < config.diffusion.linear_start < config.diffusion.linear_end < 1.0, "diffusion.linear_end",
             "must satisfy 0 < linear_start < linear_end < 1")
    # The shifted DDIM grids fit in the schedule up to T // 2 (official) or T - 1 (exact) steps.
    most_steps = config.diffusion.timesteps // 2 if s.grid == "official" else config.diffusion.timesteps - 1
    _require(2 <= s.ddim_steps <= most_steps, "sampling.ddim_steps",
             f"must be between 2 and {most_steps} with the {s.grid} grid")
    _require(2 <= s.refine_grid_steps <= most_steps, "sampling.refine_grid_steps",
             f"must be between 2 and {most_steps} with the {s.grid} grid")
    _require(1 <= s.interleaved_steps <= s.ddim_steps - 1, "sampling.interleaved_steps",
             f"must be between 1 and ddim_steps - 1 = {s.ddim_steps - 1}")
    _require(rewarp_positions_within(s.rewarp_positions, s.interleaved_steps) == tuple(s.rewarp_positions),
             "sampling.rewarp_positions",
             f"positions must lie in 1..{s.interleaved_steps - 2} (the first step uses the initial warp, "
             "the last never warps)")
    _require(s.tau > 0 and s.flow_tau > 0, "sampling.tau", "temperatures must be positive")
    _require(s.eta >= 0 and s.refine_eta >= 0, "sampling.eta", "must be >= 0")
    _require(0 < s.refine_start_index < s.refine_grid_steps, "sampling.refine_start_index",
             f"must be between 1 and refine_grid_steps - 1 = {s.refine_grid_steps - 1}")
    _require(t.batch_size >= 1, "training.batch_size", "must be >= 1")
    _require(t.grad_accumulation >= 1, "training.grad_accumulation", "must be >= 1")
    _require(t.load_size == 0 or t.load_size >= config.image_size, "training.load_size",
             f"must be 0 (no resize) or at least image_size ({config.image_size})")
    _require(t.lr_correspondence >= 0, "training.lr_correspondence", "must be >= 0")
    _require(t.lr_unet >= 0, "training.lr_unet", "must be >= 0")
    _require(t.grad_clip >= 0, "training.grad_clip", "must be >= 0 (0: no clipping)")
    _require(t.lr_correspondence_e2e >= 0, "training.lr_correspondence_e2e",
             "must be >= 0 (0: lr_correspondence)")
    _require(0.0 <= t.ema_decay < 1.0, "training.ema_decay", "must be in [0, 1)")
    _require(t.nan_patience >= 1, "training.nan_patience", "must be >= 1")
    _require(t.warmup_epochs >= 0, "training.warmup_epochs", "must be >= 0")
    _require(t.keep_checkpoints >= 1, "training.keep_checkpoints", "must be >= 1")
    losses = t.losses
    _require(len(losses.source_vgg_layers) == len(losses.source_vgg_weights),
             "training.losses.source_vgg_weights",
             "needs one weight per layer in source_vgg_layers")
    _require(len(losses.contextual_layers) == len(losses.contextual_weights) == len(losses.contextual_pool),
             "training.losses.contextual_weights", "contextual_layers, _weights and _pool need equal lengths")
