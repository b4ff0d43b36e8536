"""Pretraining of the first stage and of the unconditional latent diffusion model.

Only needed when no latent-diffusion weights exist for a dataset (DeepFashion in the paper; every
dataset on a machine without downloads). Outputs are `ldm` files, the same kind that
`midms weights import-ldm` writes: the autoencoder alone (first_stage.), or first stage + UNet.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from midms_cli import distributed
from midms_cli.checkpoint import save_modules
from midms_cli.config import ModelConfig, from_dict, to_dict, validate
from midms_cli.diffusion.ddim import ddim_step
from midms_cli.diffusion.schedule import NoiseSchedule
from midms_cli.errors import MidmsError
from midms_cli.ldm_import import KIND as LDM_KIND
from midms_cli.ldm_import import load_ldm
from midms_cli.models.autoencoder import build_autoencoder
from midms_cli.models.unet import UNetModel
from midms_cli.models.vgg import load_vgg19
from midms_cli.pipelines import loop
from midms_cli.rundir import RunDir
from midms_cli.weights import require_weight

MODELS = ("autoencoder", "diffusion")


@dataclass
class PretrainConfig:
    """Optimisation of one pretraining run (the architecture comes from the model preset)."""

    model: str = "autoencoder"  # "autoencoder" or "diffusion"
    lr: float = 2e-4
    batch_size: int = 8
    max_iters: int = 2000
    weight_decay: float = 0.0
    reconstruction: str = "l1"  # autoencoder: "l1" or "mse"
    codebook_weight: float = 1.0  # VQ codebook + commitment loss (LDM: 1.0)
    kl_weight: float = 1e-6  # KL autoencoders (LDM: 1e-6)
    perceptual_weight: float = 0.0  # > 0 adds an L1 on VGG19 r42 features (needs the vgg19 weights)
    ema_decay: float = 0.0  # diffusion: EMA of the UNet, exported as the final weights when > 0
    sample_steps: int = 20  # DDIM steps of the sample grid's unconditional samples
    grad_accumulation: int = 1
    grad_clip: float = 1.0
    amp: bool = False
    nan_patience: int = 10
    seed: int = 2021
    log_every: int = 10
    checkpoint_every: int = 500
    sample_every: int = 250
    keep_checkpoints: int = 3

    def validate(self) -> None:
        checks = [
            (self.model in MODELS, "model", f"must be one of {', '.join(MODELS)}"),
            (self.lr > 0, "lr", "must be > 0"),
            (self.batch_size >= 1, "batch_size", "must be >= 1"),
            (self.max_iters >= 1, "max_iters", "must be >= 1"),
            (self.reconstruction in ("l1", "mse"), "reconstruction", "must be l1 or mse"),
            (0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1)"),
            (self.grad_accumulation >= 1, "grad_accumulation", "must be >= 1"),
            (self.nan_patience >= 1, "nan_patience", "must be >= 1"),
            (self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1"),
        ]
        for ok, name, message in checks:
            if not ok:
                raise MidmsError(f"pretrain.{name}: {message}")

    def loop_options(self, out: Path, **overrides: Any) -> loop.LoopOptions:
        return loop.LoopOptions(
            out=out, max_iters=self.max_iters, batch_size=self.batch_size, seed=self.seed,
            grad_accumulation=self.grad_accumulation, grad_clip=self.grad_clip, ema_decay=self.ema_decay,
            amp=self.amp, nan_patience=self.nan_patience, log_every=self.log_every,
            checkpoint_every=self.checkpoint_every, sample_every=self.sample_every,
            keep_checkpoints=self.keep_checkpoints, **overrides,
        )


def ldm_config(model: ModelConfig, with_unet: bool) -> dict[str, Any]:
    """The config block of an `ldm` file (read back by ldm_import.load_ldm)."""
    config: dict[str, Any] = {"autoencoder": to_dict(model.autoencoder)}
    if with_unet:
        config["unet"] = to_dict(model.unet)
        config["diffusion"] = to_dict(model.diffusion)
    return config


def run_config(
    model: ModelConfig, pretrain: PretrainConfig, data: Path, extra: dict[str, Any]
) -> dict[str, Any]:
    """Everything config.json records: the ldm blocks, the full model preset and the optimisation."""
    return {
        **ldm_config(model, pretrain.model == "diffusion"),
        "model": model.to_dict(),
        "pretrain": to_dict(pretrain),
        "data": str(data),
        **extra,
    }


def configs_from_run(config: dict[str, Any]) -> tuple[ModelConfig, PretrainConfig]:
    return ModelConfig.from_dict(config["model"]), from_dict(PretrainConfig, config["pretrain"], "pretrain")


# --------------------------------------------------------------------------------------------
# Objectives (the modules DDP wraps)


class AutoencoderObjective(nn.Module):
    """Reconstruction (L1 or MSE) + VQ codebook/commitment (or KL) + optional VGG perceptual L1."""

    def __init__(self, autoencoder: nn.Module, config: PretrainConfig, vgg: nn.Module | None) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.config = config
        self.vgg = vgg

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        image = batch["image"]
        recon, aux = self.autoencoder(image)
        rec = F.l1_loss(recon, image) if self.config.reconstruction == "l1" else F.mse_loss(recon, image)
        losses = {"reconstruction": rec}
        total = rec
        if "vq" in aux:
            losses["codebook"] = aux["vq"]
            total = total + self.config.codebook_weight * aux["vq"]
        if "kl" in aux:
            losses["kl"] = aux["kl"]
            total = total + self.config.kl_weight * aux["kl"]
        if self.vgg is not None:
            perceptual = F.l1_loss(
                self.vgg(recon, ("r42",))["r42"], self.vgg(image, ("r42",))["r42"].detach()
            )
            losses["perceptual"] = perceptual
            total = total + self.config.perceptual_weight * perceptual
        losses["loss"] = total
        return losses


class DiffusionObjective(nn.Module):
    """LDM's ε-prediction MSE on latents of the frozen first stage, t ~ U{0, ..., T-1}."""

    def __init__(self, first_stage: nn.Module, unet: nn.Module, schedule: NoiseSchedule) -> None:
        super().__init__()
        self.first_stage = first_stage.requires_grad_(False).eval()
        self.unet = unet
        self.schedule = schedule

    def train(self, mode: bool = True) -> DiffusionObjective:
        super().train(mode)
        self.first_stage.eval()  # frozen: never in training mode
        return self

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            z0 = self.first_stage.encode(batch["image"])
        t = torch.randint(0, self.schedule.timesteps, (z0.shape[0],), device=z0.device)
        noise = torch.randn_like(z0)
        z_t = self.schedule.to(z0.device).q_sample(z0, t, noise)
        loss = F.mse_loss(self.unet(z_t, t), noise)
        return {"eps_mse": loss, "loss": loss}


@torch.no_grad()
def ddim_sample(
    unet: nn.Module, schedule: NoiseSchedule, shape: tuple[int, ...], steps: int, device: torch.device
) -> torch.Tensor:
    """Unconditional DDIM (eta = 0) from pure noise on an `exact` grid of `steps` points."""
    schedule = schedule.to(device)
    grid = schedule.grid(steps, "exact")
    a_t, a_prev = schedule.alpha_pairs(grid)
    x = torch.randn(shape, device=device)
    for i in reversed(range(len(grid))):
        t = grid[i].expand(shape[0])
        x, x0 = ddim_step(x, unet(x, t), a_t[i], a_prev[i])
    return x0


# --------------------------------------------------------------------------------------------
# Tasks (what the shared loop trains)


@dataclass
class PretrainTask:
    """What a pretraining run hands to the shared loop; subclasses add their sample grid columns."""

    model_config: ModelConfig
    pretrain: PretrainConfig
    config: dict[str, Any]
    model: nn.Module
    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, Any]
    ema_module: nn.Module | None = None
    kind: str = LDM_KIND
    with_unet: ClassVar[bool] = False  # whether the exported `ldm` file holds a UNet
    trained_by: ClassVar[str] = ""

    def export(self, path: Path) -> None:
        save_modules(
            path,
            self.modules,
            ldm_config(self.model_config, with_unet=self.with_unet),
            LDM_KIND,
            {"trained_by": self.trained_by},
        )


class AutoencoderTask(PretrainTask):
    trained_by = "midms pretrain autoencoder"

    def sample_columns(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """Ground truth | reconstruction."""
        autoencoder = self.model.autoencoder
        was_training = autoencoder.training
        autoencoder.eval()
        image = batch["image"][:4]
        recon = autoencoder.decode(autoencoder.encode(image))
        autoencoder.train(was_training)
        return [image, recon]


class DiffusionTask(PretrainTask):
    with_unet = True
    trained_by = "midms pretrain diffusion"

    def sample_columns(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """Ground truth | its autoencoder reconstruction | an unconditional DDIM sample."""
        unet, first_stage = self.model.unet, self.model.first_stage
        was_training = unet.training
        unet.eval()
        image = batch["image"][:4]
        z0 = first_stage.encode(image)
        sample = ddim_sample(
            unet, self.model.schedule, tuple(z0.shape), self.pretrain.sample_steps, image.device
        )
        unet.train(was_training)
        return [image, first_stage.decode(z0), first_stage.decode(sample)]


def _adamw(module: nn.Module, config: PretrainConfig) -> torch.optim.Optimizer:
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _constant(optimizer: torch.optim.Optimizer) -> Any:
    # A scheduler object keeps every run's training state the same shape (constant LR for pretraining).
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def build_autoencoder_task(
    model: ModelConfig, pretrain: PretrainConfig, config: dict[str, Any]
) -> AutoencoderTask:
    autoencoder = build_autoencoder(model.autoencoder)
    vgg = load_vgg19() if pretrain.perceptual_weight > 0 else None
    objective = AutoencoderObjective(autoencoder, pretrain, vgg)
    optimizer = _adamw(autoencoder, pretrain)
    return AutoencoderTask(
        model,
        pretrain,
        config,
        objective,
        {"first_stage": autoencoder},
        {"autoencoder": optimizer},
        {"autoencoder": _constant(optimizer)},
    )


def resolve_model_file(path: Path, what: str) -> Path:
    """A model file, or a run directory's final `model.safetensors` (else its newest checkpoint)."""
    path = Path(path)
    if path.is_dir():
        final = path / "model.safetensors"
        if final.is_file():
            return final
        latest = RunDir(path).latest()
        if latest is None:
            raise MidmsError(f"{path} holds no model.safetensors and no checkpoint; train the {what} first")
        return latest
    if not path.is_file():
        raise MidmsError(f"{what} not found: {path}")
    return path


def load_first_stage(path: Path, model: ModelConfig) -> nn.Module:
    """The autoencoder of an `ldm` file (ours or imported); its config replaces the preset's."""
    configs, modules = load_ldm(resolve_model_file(path, "autoencoder"))
    model.autoencoder = configs.autoencoder
    validate(model)  # e.g. the preset's UNet must take this autoencoder's latent channels and size
    return modules["first_stage"]


def build_diffusion_task(
    model: ModelConfig, pretrain: PretrainConfig, config: dict[str, Any], first_stage: nn.Module
) -> DiffusionTask:
    unet = UNetModel(model.unet)
    objective = DiffusionObjective(first_stage, unet, NoiseSchedule(model.diffusion))
    optimizer = _adamw(unet, pretrain)
    return DiffusionTask(
        model,
        pretrain,
        config,
        objective,
        {"first_stage": first_stage, "unet": unet},
        {"unet": optimizer},
        {"unet": _constant(optimizer)},
        ema_module=unet,
    )


def check_data(data: Path, model: ModelConfig, split: str = "train") -> dict[str, Any]:
    """The shard index, checked against the model's image size before any work."""
    from midms_cli.data.shards import read_index

    index = read_index(data, split)
    if int(index["image_size"]) != model.image_size:
        raise MidmsError(
            f"{data} holds {index['image_size']} px images but the model expects {model.image_size} px; "
            f"prepare shards with --size {model.image_size} or choose a matching preset"
        )
    return index


def pretrain(
    kind: str,
    data: Path,
    out: Path,
    model: ModelConfig,
    config: PretrainConfig,
    *,
    autoencoder: Path | None = None,
    device_name: str = "auto",
    num_workers: int = 0,
    extra: dict[str, Any] | None = None,
    **loop_overrides: Any,
) -> loop.LoopResult:
    """Train (or resume) the first stage or the latent diffusion model into run directory `out`."""
    config = dataclasses.replace(config, model=kind)
    config.validate()
    if config.perceptual_weight > 0:
        require_weight("vgg19")  # fail before any work when the loss network is missing
    stored = loop.read_run_config(out)
    if stored is not None and "pretrain" in stored:
        max_iters = config.max_iters
        model, config = configs_from_run(stored)
        config = dataclasses.replace(config, max_iters=max(max_iters, config.max_iters))
    device = loop.setup_device(device_name)
    check_data(data, model)
    first_stage = None
    if kind == "diffusion":
        if autoencoder is None:
            raise MidmsError("pretrain diffusion needs --autoencoder RUN_OR_FILE (a pretrained first stage)")
        first_stage = load_first_stage(autoencoder, model)
    run = run_config(
        model,
        config,
        data,
        {"autoencoder_source": str(autoencoder) if autoencoder else None, **(extra or {})},
    )
    if distributed.is_main():
        loop.write_run_config(out, run)
    # The initial weights depend on the seed only (a resumed run overwrites them anyway).
    loop.seed_everything(config.seed)
    if kind == "autoencoder":
        task: Any = build_autoencoder_task(model, config, run)
    else:
        task = build_diffusion_task(model, config, run, first_stage)
    options = config.loop_options(Path(out), **loop_overrides)
    loader = loop.shard_loader(data, "train", config.batch_size, num_workers)
    return loop.Trainer(task, options, loader, device).run()
