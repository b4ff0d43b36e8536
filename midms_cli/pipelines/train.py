"""MIDMs training: the warm-up of the correspondence networks and the end-to-end recurrent phase.

This module builds the model (from a base LDM or an earlier midms model), the optimizer and the task
that the shared loop (`pipelines.loop`) runs; the loss terms of a batch are `pipelines.objective`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from midms_cli import distributed
from midms_cli.checkpoint import load_checkpoint, module_state, read_metadata, save_modules
from midms_cli.config import ModelConfig, TrainingConfig
from midms_cli.errors import MidmsError
from midms_cli.ldm_import import load_ldm
from midms_cli.models.feature_net import build_feature_net
from midms_cli.models.midm import MIDM
from midms_cli.pipelines import loop
from midms_cli.pipelines.objective import MIDMsObjective, initial_matches
from midms_cli.pipelines.pretrain import check_data, resolve_model_file
from midms_cli.rundir import RunDir
from midms_cli.weights import require_weight

MIDMS_KIND = "midms"
WARMUP_DIR = "warmup"


# --------------------------------------------------------------------------------------------
# The task handed to the shared loop


def _condition_preview(condition: Tensor) -> Tensor:
    """First three condition channels ([0, 1]) as an image in [-1, 1] (one channel is repeated)."""
    shown = condition[:, :3]
    if shown.shape[1] < 3:
        shown = shown[:, :1].expand(-1, 3, -1, -1)
    return shown * 2 - 1


@dataclass
class MIDMsTask:
    model_config: ModelConfig
    config: dict[str, Any]
    model: MIDMsObjective
    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, Any]
    ema_module: nn.Module | None
    phase: str
    kind: str = MIDMS_KIND

    def sample_columns(self, batch: dict[str, Any]) -> list[Tensor]:
        """condition | exemplar | initial warp | output | ground truth."""
        midm = self.model.model
        was_training = midm.training
        midm.eval()
        batch = {k: v[:4] if isinstance(v, Tensor) else v for k, v in batch.items()}
        matches = initial_matches(midm, batch)
        warp = midm.decode(matches.warped)
        if self.phase == "warmup":
            output = warp
        else:
            result = midm.interleaved_loop(
                matches.warped, matches.condition, matches.exemplar, torch.randn_like(matches.warped)
            )
            output = midm.decode(result.x0)
        midm.train(was_training)
        return [_condition_preview(batch["cond"]), batch["ref"], warp, output, batch["image"]]

    def export(self, path: Path) -> None:
        save_modules(
            path,
            self.model.model.modules_to_save(),
            self.model_config,
            MIDMS_KIND,
            {"trained_by": f"midms {'warmup' if self.phase == 'warmup' else 'train'}"},
        )


def parameter_groups(model: MIDM, training: TrainingConfig, phase: str) -> list[dict[str, Any]]:
    """AdamW groups: correspondence networks at lr_correspondence (end to end:
    lr_correspondence_e2e when set), the UNet at lr_unet.

    In warm-up the UNet is frozen and left out, so warm-up cannot change it (not even by weight decay).
    """
    lr = training.lr_correspondence
    if phase == "e2e" and training.lr_correspondence_e2e > 0:
        lr = training.lr_correspondence_e2e
    groups = [
        {
            "params": list(model.correspondence.parameters()),
            "lr": lr,
            "name": "correspondence",
        }
    ]
    if phase == "e2e":
        groups.append({"params": list(model.unet.parameters()), "lr": training.lr_unet, "name": "unet"})
    return groups


def build_task(
    model: MIDM, phase: str, config: dict[str, Any], steps_per_epoch: int, offset: int
) -> MIDMsTask:
    """Freeze per phase, build the objective, AdamW (wd 0.05) and MultiStepLR (epoch milestones -> steps)."""
    training = model.config.training
    model.first_stage.requires_grad_(False)
    model.unet.requires_grad_(phase == "e2e")
    model.correspondence.requires_grad_(True)
    # Recompute the UNet's and the decoder's block activations in the backward pass instead of
    # storing them: bounds the memory of the 4 + 4 + 1 unrolled UNet calls and the two decodes.
    model.set_activation_checkpointing(training.activation_checkpointing and phase == "e2e")
    feature_net = build_feature_net(training.losses, model.first_stage)
    objective = MIDMsObjective(model, feature_net, phase)
    optimizer = torch.optim.AdamW(
        parameter_groups(model, training, phase), betas=training.betas, weight_decay=training.weight_decay
    )
    # Milestones are epochs of the whole run, the scheduler counts the steps of this phase; those the
    # warm-up already passed lower the starting learning rate instead.
    milestones = [m * steps_per_epoch - offset for m in training.milestones]
    for group in optimizer.param_groups:
        group["lr"] *= training.gamma ** sum(m <= 0 for m in milestones)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=sorted(m for m in milestones if m > 0), gamma=training.gamma
    )
    ema_module = model if phase == "e2e" else None
    return MIDMsTask(
        model.config,
        config,
        objective,
        model.modules_to_save(),
        {"midms": optimizer},
        {"midms": scheduler},
        ema_module,
        phase,
    )


# --------------------------------------------------------------------------------------------
# Building the model from a base LDM or an earlier run


def model_from_base(model_config: ModelConfig, base: Path) -> MIDM:
    """A MIDM whose first stage and UNet come from an `ldm` file (ours or imported), a pretrain run,
    or a midms model file or run (its correspondence networks are left out: they start afresh)."""
    path = resolve_model_file(base, "base diffusion model")
    if read_metadata(path).get("kind") == MIDMS_KIND:
        return _backbone_of_midms(model_config, path)
    configs, modules = load_ldm(path)
    if "unet" not in modules:
        raise MidmsError(
            f"{path} holds only a first stage; --base needs an LDM with a UNet "
            "(`midms pretrain diffusion` or `midms weights import-ldm`)"
        )
    model_config.autoencoder = configs.autoencoder
    model_config.unet = configs.unet
    if configs.diffusion is not None:
        model_config.diffusion = configs.diffusion
    model = MIDM(ModelConfig.from_dict(model_config.to_dict()))
    model.first_stage.load_state_dict(modules["first_stage"].state_dict())
    model.unet.load_state_dict(modules["unet"].state_dict())
    return model


def _backbone_of_midms(model_config: ModelConfig, path: Path) -> MIDM:
    """First stage and UNet (configs and weights) of a midms model file; new correspondence networks."""
    return _from_midms_file(model_config, path, ("first_stage", "unet"))


def model_from_midms(model_config: ModelConfig, init: Path) -> MIDM:
    """A MIDM initialised from a midms file or run (e.g. a warm-up); its architecture must match."""
    path = resolve_model_file(init, "--init model")
    return _from_midms_file(model_config, path, ("first_stage", "unet", "correspondence"))


# The config section that describes each saved module.
_CONFIG_PARTS = {
    "first_stage": ("autoencoder",),
    "unet": ("unet", "diffusion"),
    "correspondence": ("correspondence",),
}


def _from_midms_file(model_config: ModelConfig, path: Path, modules: tuple[str, ...]) -> MIDM:
    """A MIDM whose `modules` (and their config sections) are those of the midms file at `path`."""
    ckpt = load_checkpoint(path, expected_kind=MIDMS_KIND)
    stored = ModelConfig.from_dict(ckpt.metadata["config"])
    for prefix in modules:
        for part in _CONFIG_PARTS[prefix]:
            setattr(model_config, part, getattr(stored, part))
    model = MIDM(ModelConfig.from_dict(model_config.to_dict()))
    for prefix in modules:
        model.modules_to_save()[prefix].load_state_dict(module_state(ckpt, prefix))
    return model


def adapt_to_data(model_config: ModelConfig, index: dict[str, Any]) -> None:
    """The condition kind and channel count come from the shards (one model per condition)."""
    condition = index.get("condition") or {}
    if "kind" in condition:
        model_config.condition = condition["kind"]
    if "channels" in condition:
        model_config.correspondence.cond_channels = int(condition["channels"])


def total_iterations(training: TrainingConfig, steps_per_epoch: int) -> int:
    """training.max_iters, or epochs x steps per epoch when max_iters is 0 (warm-up included)."""
    return training.max_iters if training.max_iters > 0 else training.epochs * steps_per_epoch


def loop_options(training: TrainingConfig, out: Path, max_iters: int, **overrides: Any) -> loop.LoopOptions:
    return loop.LoopOptions(
        out=out,
        max_iters=max_iters,
        batch_size=training.batch_size,
        seed=training.seed,
        grad_accumulation=training.grad_accumulation,
        grad_clip=training.grad_clip,
        ema_decay=training.ema_decay,
        amp=training.amp,
        nan_patience=training.nan_patience,
        log_every=training.log_every,
        checkpoint_every=training.checkpoint_every,
        sample_every=training.sample_every,
        keep_checkpoints=training.keep_checkpoints,
        **overrides,
    )


def run_config(model_config: ModelConfig, phase: str, data: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """config.json of a run: the full model config (checkpoints carry it too) and the provenance."""
    return {**model_config.to_dict(), "run": {"phase": phase, "data": str(data), **extra}}


def stored_model_config(out: Path) -> ModelConfig | None:
    """The config of an existing run directory (resuming keeps it)."""
    stored = loop.read_run_config(out)
    if stored is None:
        return None
    stored = dict(stored)
    stored.pop("run", None)
    return ModelConfig.from_dict(stored)


def run_phase(
    phase: str,
    data: Path,
    out: Path,
    model_config: ModelConfig,
    *,
    base: Path | None = None,
    init: Path | None = None,
    device_name: str = "auto",
    num_workers: int = 0,
    extra: dict[str, Any] | None = None,
    **loop_overrides: Any,
) -> loop.LoopResult:
    """Train one phase into run directory `out` (resuming when it holds checkpoints)."""
    if model_config.training.losses.feature_net == "vgg19":
        require_weight("vgg19")  # fail before any work when the loss network is missing
    device = loop.setup_device(device_name)
    stored = stored_model_config(out)
    warmup_epochs = model_config.training.warmup_epochs  # counted in steps once the data is known
    iterations = (0 if warmup_epochs else model_config.training.warmup_iters, model_config.training.max_iters)
    if stored is not None:
        model_config = stored
        # Asking for more iterations extends a finished run.
        model_config.training.warmup_iters = max(model_config.training.warmup_iters, iterations[0])
        model_config.training.max_iters = max(model_config.training.max_iters, iterations[1])
    index = check_data(data, model_config)
    adapt_to_data(model_config, index)
    training = model_config.training
    world = distributed.world_size()
    steps_per_epoch = max(
        1, int(index["count"]) // (training.batch_size * training.grad_accumulation * world)
    )
    if warmup_epochs > 0:
        # Epochs become optimizer steps of this data; the run config records steps, which a resume keeps.
        steps = warmup_epochs * steps_per_epoch
        training.warmup_iters = max(training.warmup_iters, steps) if stored is not None else steps
    training.warmup_epochs = 0
    loop.seed_everything(training.seed)
    if stored is not None and RunDir(out).latest_resumable() is not None:
        model = MIDM(model_config)  # resuming: the weights come from the run's newest checkpoint
    elif init is not None:
        model = model_from_midms(model_config, init)
    elif base is not None:
        model = model_from_base(model_config, base)
    else:
        raise MidmsError(f"{phase} needs --base (an LDM file or pretrain run) or --init (a warm-up run)")
    model_config = model.config
    channels = int((index.get("condition") or {}).get("channels", model_config.correspondence.cond_channels))
    if model_config.correspondence.cond_channels != channels:
        raise MidmsError(
            f"the model takes {model_config.correspondence.cond_channels}-channel conditions but {data} "
            f"holds {channels}-channel ones; train on shards of the same condition kind")
    if phase == "warmup":
        max_iters, offset = training.warmup_iters, 0
    else:
        offset = training.warmup_iters
        max_iters = total_iterations(training, steps_per_epoch) - offset
        if max_iters < 1:
            raise MidmsError(
                f"training.max_iters ({total_iterations(training, steps_per_epoch)}) must exceed "
                f"training.warmup_iters ({offset}); raise --iters"
            )
    source = {"base": str(base) if base else None, "init": str(init) if init else None}
    run = run_config(model_config, phase, data, {**source, **(extra or {})})
    if distributed.is_main():
        loop.write_run_config(out, run)
    task = build_task(model, phase, model_config.to_dict(), steps_per_epoch, offset)
    options = loop_options(training, Path(out), max_iters, **loop_overrides)
    loader = loop.shard_loader(
        data, "train", training.batch_size, num_workers, load_size=training.load_size, flip=training.flip,
        self_pair_window=training.self_pair_window,
    )
    return loop.Trainer(task, options, loader, device).run()


def warmup(
    data: Path, out: Path, model_config: ModelConfig, base: Path | None = None, init: Path | None = None,
    **kwargs: Any,
) -> loop.LoopResult:
    """`midms warmup`: train the correspondence networks with the UNet frozen; new ones on `base` (an
    LDM), or those of the midms model `init`, continued."""
    return run_phase("warmup", data, out, model_config, base=base, init=init, **kwargs)


def train(
    data: Path,
    out: Path,
    model_config: ModelConfig,
    *,
    init: Path | None = None,
    base: Path | None = None,
    **kwargs: Any,
) -> loop.LoopResult:
    """`midms train`: the e2e recurrent phase; without --init the warm-up runs first into OUT/warmup."""
    model_config = ModelConfig.from_dict(model_config.to_dict())
    if init is None:
        if base is None and stored_model_config(Path(out) / WARMUP_DIR) is None:
            raise MidmsError("train needs --init WARMUP_RUN, or --base LDM_OR_RUN to run the warm-up first")
        warm = Path(out) / WARMUP_DIR
        warm_config = ModelConfig.from_dict(model_config.to_dict())
        result = run_phase("warmup", data, warm, warm_config, base=base, **kwargs)
        if result.interrupted:
            return result
        init = warm
    return run_phase("e2e", data, out, model_config, init=init, **kwargs)
