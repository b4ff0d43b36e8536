"""MIDMs training: the warm-up of the correspondence networks and the end-to-end recurrent phase.

Warm-up (the paper's first phase): the UNet is frozen and no diffusion step runs; the output is Decode(R0) and
the GT path Decode(softwarp(z_gt, C_gt)). End-to-end (second phase): the interleaved loop is unrolled
with gradients into the UNet and back into the correspondence networks, beside a GT trajectory
and a one-step diffusion-loss branch. Losses and weights as the official code.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from midms_cli import distributed, losses
from midms_cli.checkpoint import load_checkpoint, module_state, save_modules
from midms_cli.config import ModelConfig, TrainingConfig
from midms_cli.diffusion.ddim import predict_x0
from midms_cli.diffusion.schedule import q_sample
from midms_cli.errors import MidmsError
from midms_cli.ldm_import import load_ldm
from midms_cli.matching import back_warp, soft_warp
from midms_cli.models.feature_net import build_feature_net
from midms_cli.models.midm import MIDM, ConditionFeatures, ExemplarFeatures, interleaved_trajectory
from midms_cli.pipelines import loop
from midms_cli.pipelines.pretrain import check_data, resolve_model_file
from midms_cli.rundir import RunDir
from midms_cli.weights import require_weight

MIDMS_KIND = "midms"
PHASES = ("warmup", "e2e")
WARMUP_DIR = "warmup"


# --------------------------------------------------------------------------------------------
# Small pieces of the forward pass


@dataclass
class Matches:
    """The initial matches of one batch (Algorithm 1's first step)."""

    condition: ConditionFeatures  # c↓, D_x, f_x
    exemplar: ExemplarFeatures  # z_y, D_y, f_y
    ground_truth: ExemplarFeatures  # z_gt, D_gt, f_gt (matched with the condition's own map)
    warped: Tensor  # R0 = softwarp(z_y, C0)
    warped_gt: Tensor  # R_gt = softwarp(z_gt, C_gt)


def initial_matches(model: MIDM, batch: dict[str, Tensor]) -> Matches:
    """Encode exemplar and GT (detached), match both against the condition, warp both latents."""
    tau = model.config.sampling.tau
    condition = model.condition_features(batch["cond"])
    exemplar = model.encode_exemplar(batch["ref"], batch["ref_cond"])
    ground_truth = model.encode_exemplar(batch["image"], batch["cond"])
    warped = soft_warp(exemplar.latent, condition.matching, exemplar.matching, tau)
    warped_gt = soft_warp(ground_truth.latent, condition.matching, ground_truth.matching, tau)
    return Matches(condition, exemplar, ground_truth, warped, warped_gt)


def diffusion_branch(model: MIDM, z_gt: Tensor, position: int, space: str) -> Tensor:
    """Diffusion-loss branch: one DDIM step on a fresh q-sample of the clean GT latent at position k*.

    The latent is noised at the grid point before the step (official off-by-one, with
    noise_offset "previous") and the UNet is queried at the step's own timestep. Returns
    MSE(x0_pred, z_gt) (space "x0", official) or MSE(eps_pred, eps) (space "eps", Eq. 17).
    """
    plan = interleaved_trajectory(model.config.sampling, model.alphas_cumprod)
    step = plan.steps[position]
    if model.config.sampling.noise_offset == "previous":
        t_noise = plan.t_noise if position == 0 else plan.steps[position - 1].t
    else:
        t_noise = step.t
    noise = torch.randn_like(z_gt)
    z_t = q_sample(z_gt, t_noise, noise, model.alphas_cumprod)
    eps = model.eps(model.unet, z_t, step.t)
    if space == "eps":
        return losses.diffusion_loss_eps(eps, noise)
    return losses.diffusion_loss_x0(predict_x0(z_t, eps, step.a_t), z_gt)


def segmentation_term(model: MIDM, matches: Matches, batch: dict[str, Tensor]) -> Tensor:
    """LSUN warped-segmentation loss: warp the exemplar's one-hot with C0."""
    exemplar_onehot = model.to_latent_grid(batch["ref_cond"], tuple(matches.warped.shape[-2:]))
    warped = soft_warp(exemplar_onehot, matches.condition.matching, matches.exemplar.matching,
                       model.config.sampling.tau)
    labels = matches.condition.condition.argmax(dim=1)
    return losses.warped_segmentation_loss(warped, labels, exemplar_onehot)


# --------------------------------------------------------------------------------------------
# The objective (the module DDP wraps)


class MIDMsObjective(nn.Module):
    """forward(batch) -> the loss terms of one phase ("warmup" or "e2e") and their total."""

    def __init__(self, model: MIDM, feature_net: nn.Module, phase: str) -> None:
        super().__init__()
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}")
        self.model = model
        self.feature_net = feature_net.requires_grad_(False)
        self.phase = phase
        self.weights = model.config.training.losses

    def _features(self, image: Tensor, layers: tuple[str, ...]) -> dict[str, Tensor]:
        return self.feature_net(image, layers)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        w, model = self.weights, self.model
        matches = initial_matches(model, batch)
        z_y, z_gt = matches.exemplar.latent, matches.ground_truth.latent
        terms: dict[str, Tensor] = {}
        # Eq. 12 and the initial cycle (Eq. 13), both phases.
        terms["domain"] = w.domain * losses.domain_alignment_loss(
            matches.condition.features, matches.ground_truth.features, matches.exemplar.features)
        cycle = losses.cycle_consistency_loss(
            back_warp(
                matches.warped,
                matches.condition.matching,
                matches.exemplar.matching,
                model.config.sampling.tau,
            ),
            z_y,
        )
        twice = self.phase == "warmup" and w.warmup_cycle_twice  # as the official code
        terms["cycle"] = w.cycle * cycle * (2.0 if twice else 1.0)
        if self.phase == "warmup":
            output, source_output = model.decode(matches.warped), model.decode(matches.warped_gt)
            terms["diffusion"] = w.diffusion * losses.self_warp_reconstruction_loss(matches.warped_gt, z_gt)
            if w.segmentation > 0:
                terms["segmentation"] = w.segmentation * segmentation_term(model, matches, batch)
        else:
            output, source_output = self._recurrent(matches, terms)
        # Eq. 14 and 15 on the feature net; Eq. 16 after warm-up only.
        layers = tuple(
            dict.fromkeys(
                (
                    *w.source_vgg_layers,
                    w.perceptual_layer,
                    *(w.contextual_layers if self.phase == "e2e" and w.contextual > 0 else ()),
                )
            )
        )
        target = self._features(batch["image"], layers)
        source = self._features(source_output, tuple(w.source_vgg_layers))
        terms["source"] = w.source_vgg * losses.source_condition_loss(
            source, target, w.source_vgg_layers, w.source_vgg_weights
        )
        produced = self._features(output, layers)
        terms["perceptual"] = w.perceptual * losses.perceptual_loss(
            produced[w.perceptual_layer], target[w.perceptual_layer]
        )
        if self.phase == "e2e" and w.contextual > 0:
            exemplar = self._features(batch["ref"], tuple(w.contextual_layers))
            terms["contextual"] = w.contextual * losses.contextual_style_loss(
                produced,
                exemplar,
                w.contextual_layers,
                w.contextual_weights,
                w.contextual_pool,
                w.contextual_h,
                w.contextual_mode,
                w.contextual_wta,
            )
        terms["loss"] = torch.stack(list(terms.values())).sum()
        return terms

    def _recurrent(self, matches: Matches, terms: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The end-to-end pass: exemplar trajectory (re-warps fed back), GT trajectory (re-warps only for the
        cycle loss), iterative cycle losses (2b) and the diffusion-loss branch (6)."""
        w, model, tau = self.weights, self.model, self.model.config.sampling.tau
        z_y, z_gt = matches.exemplar.latent, matches.ground_truth.latent
        ref = model.interleaved_loop(
            matches.warped, matches.condition, matches.exemplar, torch.randn_like(z_y)
        )
        src = model.interleaved_loop(
            matches.warped_gt,
            matches.condition,
            matches.ground_truth,
            torch.randn_like(z_gt),
            feed_back=False,
        )
        cycles = []
        for result, original in ((ref, z_y), (src, z_gt)):
            for step in result.steps:
                if step.rewarp is not None:
                    back = back_warp(step.rewarp.warped, step.rewarp.query, step.rewarp.key, tau)
                    cycles.append(losses.cycle_consistency_loss(back, original))
        if cycles:
            terms["cycle_iterative"] = w.cycle * torch.stack(cycles).sum()
        position = random.randrange(len(ref.steps))  # k* uniform over the loop positions
        terms["diffusion"] = w.diffusion * diffusion_branch(model, z_gt, position, w.diffusion_space)
        return model.decode(ref.x0), model.decode(src.x0)


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
    """A MIDM whose first stage and UNet come from an `ldm` file (ours or imported) or a pretrain run."""
    path = resolve_model_file(base, "base diffusion model")
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


def model_from_midms(model_config: ModelConfig, init: Path) -> MIDM:
    """A MIDM initialised from a midms file or run (e.g. a warm-up); its architecture must match."""
    path = resolve_model_file(init, "--init model")
    ckpt = load_checkpoint(path, expected_kind=MIDMS_KIND)
    stored = ModelConfig.from_dict(ckpt.metadata["config"])
    for part in ("autoencoder", "unet", "diffusion", "correspondence"):
        setattr(model_config, part, getattr(stored, part))
    model = MIDM(ModelConfig.from_dict(model_config.to_dict()))
    for prefix, module in model.modules_to_save().items():
        module.load_state_dict(module_state(ckpt, prefix))
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
        data, "train", training.batch_size, num_workers, load_size=training.load_size, flip=training.flip
    )
    return loop.Trainer(task, options, loader, device).run()


def warmup(data: Path, out: Path, model_config: ModelConfig, base: Path, **kwargs: Any) -> loop.LoopResult:
    """`midms warmup`: train the correspondence networks with the UNet frozen."""
    return run_phase("warmup", data, out, model_config, base=base, **kwargs)


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
