"""`midms pretrain autoencoder|diffusion`, `midms warmup` and `midms train`.

Every command trains into a run directory (config.json, checkpoints, metrics.jsonl, sample grids,
final model.safetensors); running it again on the same directory resumes exactly. Works under
`torchrun --nproc_per_node=N -m midms_cli ...` as well as in one process.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from midms_cli import distributed
from midms_cli.atomic import check_output_dir, undo_on_failure
from midms_cli.cli.state import STATE, emit
from midms_cli.config import PRESETS, ModelConfig, preset, validate
from midms_cli.errors import MidmsError
from midms_cli.pipelines.loop import LoopResult

pretrain_app = typer.Typer(
    name="pretrain",
    help="Pretrain the first stage or the latent diffusion model (when no LDM weights exist).",
    no_args_is_help=True,
)

_PRESET_HELP = f"Model preset: {', '.join(PRESETS)}."
_RUN = "Run"
_OPT = "Optimisation"
_LOG = "Logging and checkpoints"

# Options shared by several commands, declared once (type + typer.Option); defaults stay in the
# signatures. None means "keep the value of the preset or config".
Data = Annotated[
    Path, typer.Option("--data", help="Prepared shards (midms prepare ... --out DIR).", rich_help_panel=_RUN)
]
Out = Annotated[
    Path, typer.Option("--out", "-o", help="Run directory (resumed when it exists).", rich_help_panel=_RUN)
]
Seed = Annotated[int | None, typer.Option("--seed", help="Seed (default 2021).", rich_help_panel=_RUN)]
Workers = Annotated[
    int, typer.Option("--workers", min=0, help="DataLoader workers per process.", rich_help_panel=_RUN)
]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Print the resolved config JSON and stop.")]
Trace = Annotated[bool, typer.Option("--trace", hidden=True)]
# pretrain autoencoder | diffusion (defaults from PretrainConfig)
PretrainIters = Annotated[
    int | None, typer.Option("--iters", min=1, help="Optimizer steps (default 2000).", rich_help_panel=_OPT)
]
PretrainBatch = Annotated[
    int | None,
    typer.Option("--batch-size", min=1, help="Batch per process (default 8).", rich_help_panel=_OPT),
]
PretrainLr = Annotated[
    float | None, typer.Option("--lr", help="AdamW learning rate (default 2e-4).", rich_help_panel=_OPT)
]
PretrainCheckpointEvery = Annotated[
    int | None,
    typer.Option(
        "--checkpoint-every", min=1, rich_help_panel=_LOG, help="Steps between checkpoints (default 500)."
    ),
]
PretrainSampleEvery = Annotated[
    int | None,
    typer.Option(
        "--sample-every",
        min=0,
        rich_help_panel=_LOG,
        help="Steps between sample grids (default 250; 0: only at the end).",
    ),
]
# warmup | train (defaults from the preset's or config's training block)
Preset = Annotated[str, typer.Option("--preset", help=_PRESET_HELP, rich_help_panel=_RUN)]
ConfigFile = Annotated[
    Path | None,
    typer.Option("--config", help="A full config JSON instead of --preset.", rich_help_panel=_RUN),
]
BatchSize = Annotated[
    int | None, typer.Option("--batch-size", min=1, help="Batch per process.", rich_help_panel=_OPT)
]
FeatureNet = Annotated[
    str | None,
    typer.Option(
        "--feature-net", help="Loss features: vgg19 (needs weights) or first-stage.", rich_help_panel=_OPT
    ),
]
GradClip = Annotated[
    float | None, typer.Option("--grad-clip", help="Clip the gradient norm (0: off).", rich_help_panel=_OPT)
]
CheckpointEvery = Annotated[
    int | None,
    typer.Option("--checkpoint-every", min=1, rich_help_panel=_LOG, help="Steps between checkpoints."),
]
SampleEvery = Annotated[
    int | None,
    typer.Option(
        "--sample-every", min=0, rich_help_panel=_LOG, help="Steps between sample grids (0: only at the end)."
    ),
]


def _command_line() -> str:
    return " ".join(["midms", *sys.argv[1:]])


def _print_config(config: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def _process_group() -> Iterator[None]:
    """Leave the torchrun process group on the way out (success or error), so ranks exit cleanly."""
    try:
        yield
    finally:
        distributed.cleanup()


def _emit_result(result: LoopResult, out: Path, what: str) -> None:
    if not distributed.is_main():
        return
    record = {
        "run": str(out),
        "step": result.step,
        "interrupted": result.interrupted,
        "nonfinite_skipped": result.nonfinite_skipped,
        "losses": result.last_losses,
        "model": str(result.final_model) if result.final_model else None,
    }
    if result.interrupted:
        human = (f"{what} interrupted at step {result.step}; checkpoint saved in {out} "
                 "(run the command again to resume)")
    else:
        human = f"{what} finished at step {result.step}: {result.final_model}"
    emit(record, human)


def _resumable(path: Path) -> bool:
    """A file worth keeping after a failure: a checkpoint or training state to resume from."""
    return path.name.startswith(("ckpt-", "state-")) and path.suffix == ".safetensors"


def _run_training(
    what: str,
    run: Callable[..., LoopResult],
    data: Path,
    out: Path,
    workers: int,
    trace: bool,
    *args: Any,
    **kwargs: Any,
) -> None:
    """run(data, out, *args, **kwargs) with the CLI's device, workers and provenance, in the
    torchrun process group when there is one; rank 0 reports the result.

    A run that fails before its first checkpoint leaves no run directory behind; one stopped by a
    signal exits with 128 + the signal number (130 for Ctrl-C) after saving its checkpoint, so
    `midms train ... && midms eval ...` does not go on with an unfinished model.
    """
    check_output_dir(out)
    if not data.is_dir():
        raise MidmsError(f"--data {data} is not a folder of prepared shards (midms prepare ... --out DIR)")
    undo = undo_on_failure(out, _resumable) if distributed.is_main() else contextlib.nullcontext()
    with _process_group(), undo:
        result = run(
            data,
            out,
            *args,
            device_name=STATE.device,
            num_workers=workers,
            extra={"command": _command_line()},
            trace=trace,
            progress=not STATE.json,
            **kwargs,
        )
        _emit_result(result, out, what)
    if result.interrupted:
        raise typer.Exit(128 + (result.signal or 2))


def _check_finite(name: str, value: Any) -> None:
    """NaN or infinity given on the command line is refused by name (comparisons let NaN through)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise MidmsError(f"{name}: must be a finite number, got {value}")


def _override(config: ModelConfig, **values: Any) -> ModelConfig:
    """Apply CLI overrides (None = keep the preset's value) to config.training, then validate."""
    training = config.training
    for name, value in values.items():
        if value is None:
            continue
        _check_finite(f"training.{name}", value)
        if name == "feature_net":
            training.losses.feature_net = value
        else:
            setattr(training, name, value)
    validate(config)
    return config


# --------------------------------------------------------------------------------------------
# midms pretrain


def _pretrain(
    kind: str,
    data: Path,
    out: Path,
    preset_name: str,
    iters: int | None,
    batch_size: int | None,
    lr: float | None,
    extra: dict[str, Any],
    dry_run: bool,
    workers: int,
    trace: bool,
) -> None:
    from midms_cli.pipelines import pretrain as pipeline

    model = preset(preset_name)
    config = pipeline.PretrainConfig(model=kind)
    autoencoder = extra.pop("autoencoder_path", None)
    values = {"max_iters": iters, "batch_size": batch_size, "lr": lr, **extra}
    for name, value in values.items():
        if value is not None:
            _check_finite(f"pretrain.{name}", value)
            setattr(config, name, value)
    config.validate()
    if dry_run:
        _print_config(pipeline.run_config(model, config, data, {"command": _command_line()}))
        return
    run = functools.partial(pipeline.pretrain, kind)
    _run_training(f"pretrain {kind}", run, data, out, workers, trace, model, config, autoencoder=autoencoder)


@pretrain_app.command("autoencoder")
def pretrain_autoencoder(
    data: Data,
    out: Out,
    preset_name: Preset = "tiny",
    iters: PretrainIters = None,
    batch_size: PretrainBatch = None,
    lr: PretrainLr = None,
    reconstruction: str | None = typer.Option(
        None, "--reconstruction", help="l1 or mse (default l1).", rich_help_panel=_OPT
    ),
    perceptual: float | None = typer.Option(
        None,
        "--perceptual",
        help="Weight of a VGG19 r42 L1 term (default 0; > 0 needs `midms weights add vgg19 ...`).",
        rich_help_panel=_OPT,
    ),
    checkpoint_every: PretrainCheckpointEvery = None,
    sample_every: PretrainSampleEvery = None,
    seed: Seed = None,
    workers: Workers = 0,
    dry_run: DryRun = False,
    trace: Trace = False,
) -> None:
    """Pretrain the autoencoder (first stage): reconstruction + codebook/commitment (or KL) losses.

    Example: midms pretrain autoencoder --data shards/synth --out runs/ae --preset tiny --iters 2000
    """
    extra = {
        "reconstruction": reconstruction,
        "perceptual_weight": perceptual,
        "seed": seed,
        "checkpoint_every": checkpoint_every,
        "sample_every": sample_every,
    }
    _pretrain("autoencoder", data, out, preset_name, iters, batch_size, lr, extra, dry_run, workers, trace)


@pretrain_app.command("diffusion")
def pretrain_diffusion(
    data: Data,
    autoencoder: Annotated[
        Path,
        typer.Option("--autoencoder", help="Autoencoder run directory or ldm file.", rich_help_panel=_RUN),
    ],
    out: Out,
    preset_name: str = typer.Option(
        "tiny", "--preset", help=_PRESET_HELP + " (its UNet is trained).", rich_help_panel=_RUN
    ),
    iters: PretrainIters = None,
    batch_size: PretrainBatch = None,
    lr: PretrainLr = None,
    ema_decay: float | None = typer.Option(
        None,
        "--ema-decay",
        help="EMA of the UNet, exported as the final weights (default 0: off).",
        rich_help_panel=_OPT,
    ),
    checkpoint_every: PretrainCheckpointEvery = None,
    sample_every: PretrainSampleEvery = None,
    seed: Seed = None,
    workers: Workers = 0,
    dry_run: DryRun = False,
    trace: Trace = False,
) -> None:
    """Pretrain an unconditional latent diffusion UNet (ε-prediction MSE) on a frozen autoencoder.

    Example: midms pretrain diffusion --data shards/synth --autoencoder runs/ae --out runs/ldm --iters 4000
    """
    extra = {
        "ema_decay": ema_decay,
        "seed": seed,
        "checkpoint_every": checkpoint_every,
        "sample_every": sample_every,
    }
    extra["autoencoder_path"] = autoencoder
    _pretrain("diffusion", data, out, preset_name, iters, batch_size, lr, extra, dry_run, workers, trace)


# --------------------------------------------------------------------------------------------
# midms warmup / midms train


def _training_config(preset_name: str, config_file: Path | None, overrides: dict[str, Any]) -> ModelConfig:
    if config_file is not None:
        model = _read_config_file(config_file)
    else:
        model = preset(preset_name)
    return _override(model, **overrides)


def _read_config_file(path: Path) -> ModelConfig:
    """A config JSON given with --config (a run directory's config.json is accepted as it is)."""
    if not path.exists():
        raise MidmsError(f"--config {path}: config file not found")
    if path.is_dir():
        raise MidmsError(f"--config {path} is a folder; give a config JSON file")
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

    _print_config(pipeline.run_config(model, phase, data, {"command": _command_line(), **extra}))


def warmup_command(
    data: Data,
    base: Annotated[
        Path,
        typer.Option(
            "--base",
            help="LDM file (midms weights import-ldm) or pretrain diffusion run.",
            rich_help_panel=_RUN,
        ),
    ],
    out: Out,
    preset_name: Preset = "tiny",
    config_file: ConfigFile = None,
    iters: int | None = typer.Option(
        None, "--iters", min=1, help="Warm-up steps (preset: training.warmup_iters).", rich_help_panel=_OPT
    ),
    epochs: int | None = typer.Option(
        None, "--epochs", min=1, help="Warm up for this many epochs instead of --iters.", rich_help_panel=_OPT
    ),
    batch_size: BatchSize = None,
    lr: float | None = typer.Option(
        None, "--lr", help="Learning rate of the correspondence networks.", rich_help_panel=_OPT
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
    """Warm up the correspondence networks with the diffusion UNet frozen (spec 2.1).

    Example: midms warmup --data shards/synth --base runs/ldm --out runs/warm --iters 200
    """
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
        _dry_run(model, "warmup", data, {"base": str(base)})
        return
    from midms_cli.pipelines import train as pipeline

    _run_training("warm-up", pipeline.warmup, data, out, workers, trace, model, base)


def train_command(
    data: Data,
    out: Out,
    init: Path | None = typer.Option(
        None, "--init", help="Warm-up run (or midms file) to start from.", rich_help_panel=_RUN
    ),
    base: Path | None = typer.Option(
        None,
        "--base",
        help="Without --init: LDM file or pretrain run; the warm-up runs first into OUT/warmup.",
        rich_help_panel=_RUN,
    ),
    preset_name: Preset = "tiny",
    config_file: ConfigFile = None,
    iters: int | None = typer.Option(
        None,
        "--iters",
        min=1,
        help="Total steps incl. warm-up (training.max_iters; 0 in the preset: epochs).",
        rich_help_panel=_OPT,
    ),
    warmup_iters: int | None = typer.Option(
        None, "--warmup-iters", min=0, help="Warm-up steps.", rich_help_panel=_OPT
    ),
    warmup_epochs: int | None = typer.Option(
        None, "--warmup-epochs", min=1, help="Warm-up epochs instead of --warmup-iters.", rich_help_panel=_OPT
    ),
    batch_size: BatchSize = None,
    lr_correspondence: float | None = typer.Option(
        None,
        "--lr-correspondence",
        rich_help_panel=_OPT,
        help="Learning rate of the correspondence networks in this phase (training.lr_correspondence_e2e).",
    ),
    warmup_lr: float | None = typer.Option(
        None,
        "--warmup-lr",
        rich_help_panel=_OPT,
        help="Without --init: learning rate of the correspondence networks in the warm-up.",
    ),
    lr_unet: float | None = typer.Option(
        None, "--lr-unet", help="Learning rate of the UNet (paper 1.5e-7).", rich_help_panel=_OPT
    ),
    grad_accumulation: int | None = typer.Option(
        None, "--grad-accumulation", min=1, rich_help_panel=_OPT, help="Micro-batches per optimizer step."
    ),
    grad_clip: GradClip = None,
    ema_decay: float | None = typer.Option(
        None, "--ema-decay", help="EMA of the trained weights (0: off).", rich_help_panel=_OPT
    ),
    amp: bool | None = typer.Option(
        None, "--amp/--no-amp", help="Mixed precision (CUDA only).", rich_help_panel=_OPT
    ),
    activation_checkpointing: bool | None = typer.Option(
        None,
        "--activation-checkpointing/--no-activation-checkpointing",
        rich_help_panel=_OPT,
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
    """Train MIDMs end to end: the interleaved loop unrolled with gradients (spec 2.2).

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

    _run_training("training", pipeline.train, data, out, workers, trace, model, init=init, base=base)


def register(app: typer.Typer) -> None:
    app.add_typer(pretrain_app, name="pretrain")
    app.command("warmup")(warmup_command)
    app.command("train")(train_command)
