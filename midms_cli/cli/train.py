"""`midms warmup` and `midms train` (and the registration of `midms pretrain`, see cli/pretrain.py).

Every command trains into a run directory (config.json, checkpoints, metrics.jsonl, sample grids,
final model.safetensors); running it again on the same directory resumes exactly. Works under
`torchrun --nproc_per_node=N -m midms_cli ...` as well as in one process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from midms_cli.cli import pretrain as pretrain_commands
from midms_cli.cli.runs import (
    LOG,
    OPT,
    RUN,
    Data,
    DryRun,
    Out,
    Preset,
    Seed,
    Trace,
    Workers,
    check_finite,
    command_line,
    print_config,
    run_training,
)
from midms_cli.config import ModelConfig, validate
from midms_cli.errors import MidmsError
from midms_cli.presets import preset

# warmup | train (defaults from the preset's or config's training block)
ConfigFile = Annotated[
    Path | None,
    typer.Option(
        "--config", help="A full config JSON (or a model file's stored config) instead of --preset.",
        rich_help_panel=RUN,
    ),
]
BatchSize = Annotated[
    int | None, typer.Option("--batch-size", min=1, help="Batch per process.", rich_help_panel=OPT)
]
FeatureNet = Annotated[
    str | None,
    typer.Option(
        "--feature-net", help="Loss features: vgg19 (needs weights) or first-stage.", rich_help_panel=OPT
    ),
]
GradClip = Annotated[
    float | None, typer.Option("--grad-clip", help="Clip the gradient norm (0: off).", rich_help_panel=OPT)
]
CheckpointEvery = Annotated[
    int | None,
    typer.Option("--checkpoint-every", min=1, rich_help_panel=LOG, help="Steps between checkpoints."),
]
SampleEvery = Annotated[
    int | None,
    typer.Option(
        "--sample-every", min=0, rich_help_panel=LOG, help="Steps between sample grids (0: only at the end)."
    ),
]


def _override(config: ModelConfig, **values: Any) -> ModelConfig:
    """Apply CLI overrides (None = keep the preset's value) to config.training, then validate."""
    training = config.training
    for name, value in values.items():
        if value is None:
            continue
        check_finite(f"training.{name}", value)
        if name == "feature_net":
            training.losses.feature_net = value
        else:
            setattr(training, name, value)
    validate(config)
    return config


# --------------------------------------------------------------------------------------------
# midms warmup / midms train


def _training_config(preset_name: str, config_file: Path | None, overrides: dict[str, Any]) -> ModelConfig:
    if config_file is not None:
        model = _read_config_file(config_file)
    else:
        model = preset(preset_name)
    return _override(model, **overrides)


def _read_config_file(path: Path) -> ModelConfig:
    """A config JSON given with --config (a run directory's config.json is accepted as it is), or a
    midms model file (.safetensors), whose stored config is used."""
    if not path.exists():
        raise MidmsError(f"--config {path}: config file not found")
    if path.is_dir():
        raise MidmsError(f"--config {path} is a folder; give a config JSON file")
    if path.suffix == ".safetensors":
        from midms_cli.checkpoint import read_metadata
        from midms_cli.pipelines.translate import MODEL_KIND

        stored = read_metadata(path, expected_kind=MODEL_KIND).get("config")
        if not isinstance(stored, dict):
            raise MidmsError(f"--config {path} is a model file without a stored config")
        return ModelConfig.from_dict(stored)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise MidmsError(f"--config {path} is not UTF-8 text; give a config JSON file") from None
    except json.JSONDecodeError as exc:
        raise MidmsError(f"--config {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except OSError as exc:
        raise MidmsError(f"--config {path}: cannot read it ({exc.strerror})") from None
    if not isinstance(data, dict):
        raise MidmsError(f"--config {path} holds a JSON {type(data).__name__}; a config is an object")
    data.pop("run", None)
    try:
        return ModelConfig.from_dict(data)
    except MidmsError as exc:
        raise MidmsError(f"--config {path}: {exc}") from None


def _dry_run(model: ModelConfig, phase: str, data: Path, extra: dict[str, Any]) -> None:
    from midms_cli.pipelines import train as pipeline

    print_config(pipeline.run_config(model, phase, data, {"command": command_line(), **extra}))


def warmup_command(
    data: Data,
    out: Out,
    base: Path | None = typer.Option(
        None,
        "--base",
        help="LDM file (midms weights import-ldm), pretrain diffusion run, or midms model whose "
        "first stage and UNet are kept (its correspondence networks are not).",
        rich_help_panel=RUN,
    ),
    init: Path | None = typer.Option(
        None,
        "--init",
        help="Instead of --base: a midms model file or run whose correspondence networks are trained on.",
        rich_help_panel=RUN,
    ),
    preset_name: Preset = "tiny",
    config_file: ConfigFile = None,
    iters: int | None = typer.Option(
        None, "--iters", min=1, help="Warm-up steps (preset: training.warmup_iters).", rich_help_panel=OPT
    ),
    epochs: int | None = typer.Option(
        None, "--epochs", min=1, help="Warm up for this many epochs instead of --iters.", rich_help_panel=OPT
    ),
    batch_size: BatchSize = None,
    lr: float | None = typer.Option(
        None, "--lr", help="Learning rate of the correspondence networks.", rich_help_panel=OPT
    ),
    feature_net: FeatureNet = None,
    grad_clip: GradClip = None,
    checkpoint_every: CheckpointEvery = None,
    sample_every: SampleEvery = None,
    seed: Seed = None,
    workers: Workers = 0,
    dry_run: DryRun = False,
    trace: Trace = False,
) -> None:
    """Warm up the correspondence networks with the diffusion UNet frozen (the paper's first phase).

    Example: midms warmup --data shards/synth --base runs/ldm --out runs/warm --iters 200

    Example: midms warmup --data shards/mine --init model.safetensors --config model.safetensors
    --out runs/warm2
    """
    if (base is None) == (init is None):
        raise MidmsError(
            "warmup needs exactly one of --base (an LDM file, pretrain run or model: new correspondence "
            "networks) and --init (a midms model or run: continue its correspondence networks)"
        )
    overrides = {
        "warmup_iters": iters,
        "warmup_epochs": epochs,
        "batch_size": batch_size,
        "lr_correspondence": lr,
        "feature_net": feature_net,
        "grad_clip": grad_clip,
        "checkpoint_every": checkpoint_every,
        "sample_every": sample_every,
        "seed": seed,
    }
    model = _training_config(preset_name, config_file, overrides)
    if dry_run:
        source = {"base": str(base) if base else None, "init": str(init) if init else None}
        _dry_run(model, "warmup", data, source)
        return
    from midms_cli.pipelines import train as pipeline

    run_training("warm-up", pipeline.warmup, data, out, workers, trace, model, base=base, init=init)


def train_command(
    data: Data,
    out: Out,
    init: Path | None = typer.Option(
        None, "--init", help="Warm-up run (or midms file) to start from.", rich_help_panel=RUN
    ),
    base: Path | None = typer.Option(
        None,
        "--base",
        help="Without --init: LDM file or pretrain run; the warm-up runs first into OUT/warmup.",
        rich_help_panel=RUN,
    ),
    preset_name: Preset = "tiny",
    config_file: ConfigFile = None,
    iters: int | None = typer.Option(
        None,
        "--iters",
        min=1,
        help="Total steps incl. warm-up (training.max_iters; 0 in the preset: epochs).",
        rich_help_panel=OPT,
    ),
    warmup_iters: int | None = typer.Option(
        None, "--warmup-iters", min=0, help="Warm-up steps.", rich_help_panel=OPT
    ),
    warmup_epochs: int | None = typer.Option(
        None, "--warmup-epochs", min=1, help="Warm-up epochs instead of --warmup-iters.", rich_help_panel=OPT
    ),
    batch_size: BatchSize = None,
    lr_correspondence: float | None = typer.Option(
        None,
        "--lr-correspondence",
        rich_help_panel=OPT,
        help="Learning rate of the correspondence networks in this phase (training.lr_correspondence_e2e).",
    ),
    warmup_lr: float | None = typer.Option(
        None,
        "--warmup-lr",
        rich_help_panel=OPT,
        help="Without --init: learning rate of the correspondence networks in the warm-up.",
    ),
    lr_unet: float | None = typer.Option(
        None, "--lr-unet", help="Learning rate of the UNet (paper 1.5e-7).", rich_help_panel=OPT
    ),
    grad_accumulation: int | None = typer.Option(
        None, "--grad-accumulation", min=1, rich_help_panel=OPT, help="Micro-batches per optimizer step."
    ),
    grad_clip: GradClip = None,
    ema_decay: float | None = typer.Option(
        None, "--ema-decay", help="EMA of the trained weights (0: off).", rich_help_panel=OPT
    ),
    amp: bool | None = typer.Option(
        None, "--amp/--no-amp", help="Mixed precision (CUDA only).", rich_help_panel=OPT
    ),
    activation_checkpointing: bool | None = typer.Option(
        None,
        "--activation-checkpointing/--no-activation-checkpointing",
        rich_help_panel=OPT,
        help="Recompute UNet activations in the backward pass (less memory, more time).",
    ),
    feature_net: FeatureNet = None,
    checkpoint_every: CheckpointEvery = None,
    sample_every: SampleEvery = None,
    seed: Seed = None,
    workers: Workers = 0,
    dry_run: DryRun = False,
    trace: Trace = False,
) -> None:
    """Train MIDMs end to end: the interleaved loop unrolled with gradients (the paper's second phase).

    Example: midms train --data shards/synth --init runs/warm --out runs/midms --iters 400
    """
    overrides = {
        "max_iters": iters,
        "warmup_iters": warmup_iters,
        "warmup_epochs": warmup_epochs,
        "batch_size": batch_size,
        "lr_correspondence_e2e": lr_correspondence,
        "lr_correspondence": warmup_lr,
        "lr_unet": lr_unet,
        "grad_accumulation": grad_accumulation,
        "grad_clip": grad_clip,
        "ema_decay": ema_decay,
        "amp": amp,
        "activation_checkpointing": activation_checkpointing,
        "feature_net": feature_net,
        "checkpoint_every": checkpoint_every,
        "sample_every": sample_every,
        "seed": seed,
    }
    model = _training_config(preset_name, config_file, overrides)
    if dry_run:
        _dry_run(
            model, "e2e", data, {"init": str(init) if init else None, "base": str(base) if base else None}
        )
        return
    from midms_cli.pipelines import train as pipeline

    run_training("training", pipeline.train, data, out, workers, trace, model, init=init, base=base)


def register(app: typer.Typer) -> None:
    app.add_typer(pretrain_commands.pretrain_app, name="pretrain")
    app.command("warmup")(warmup_command)
    app.command("train")(train_command)
