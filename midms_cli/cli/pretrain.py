"""`midms pretrain autoencoder|diffusion`: the first stage and the unconditional latent diffusion model.

Only needed when no latent-diffusion weights exist; each command trains into a run directory and
resumes when run again on it.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Any

import typer

from midms_cli.cli.runs import (
    LOG,
    OPT,
    PRESET_HELP,
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
from midms_cli.presets import preset

pretrain_app = typer.Typer(
    name="pretrain",
    help="Pretrain the first stage or the latent diffusion model (when no LDM weights exist).",
    no_args_is_help=True,
)

# Options of both pretrain commands (defaults from PretrainConfig).
PretrainIters = Annotated[
    int | None, typer.Option("--iters", min=1, help="Optimizer steps (default 2000).", rich_help_panel=OPT)
]
PretrainBatch = Annotated[
    int | None,
    typer.Option("--batch-size", min=1, help="Batch per process (default 8).", rich_help_panel=OPT),
]
PretrainLr = Annotated[
    float | None, typer.Option("--lr", help="AdamW learning rate (default 2e-4).", rich_help_panel=OPT)
]
PretrainCheckpointEvery = Annotated[
    int | None,
    typer.Option(
        "--checkpoint-every", min=1, rich_help_panel=LOG, help="Steps between checkpoints (default 500)."
    ),
]
PretrainSampleEvery = Annotated[
    int | None,
    typer.Option(
        "--sample-every",
        min=0,
        rich_help_panel=LOG,
        help="Steps between sample grids (default 250; 0: only at the end).",
    ),
]


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
            check_finite(f"pretrain.{name}", value)
            setattr(config, name, value)
    config.validate()
    if dry_run:
        print_config(pipeline.run_config(model, config, data, {"command": command_line()}))
        return
    run = functools.partial(pipeline.pretrain, kind)
    run_training(f"pretrain {kind}", run, data, out, workers, trace, model, config, autoencoder=autoencoder)


@pretrain_app.command("autoencoder")
def pretrain_autoencoder(
    data: Data,
    out: Out,
    preset_name: Preset = "tiny",
    iters: PretrainIters = None,
    batch_size: PretrainBatch = None,
    lr: PretrainLr = None,
    reconstruction: str | None = typer.Option(
        None, "--reconstruction", help="l1 or mse (default l1).", rich_help_panel=OPT
    ),
    perceptual: float | None = typer.Option(
        None,
        "--perceptual",
        help="Weight of a VGG19 r42 L1 term (default 0; > 0 needs `midms weights add vgg19 ...`).",
        rich_help_panel=OPT,
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
        typer.Option("--autoencoder", help="Autoencoder run directory or ldm file.", rich_help_panel=RUN),
    ],
    out: Out,
    preset_name: str = typer.Option(
        "tiny", "--preset", help=PRESET_HELP + " (its UNet is trained).", rich_help_panel=RUN
    ),
    iters: PretrainIters = None,
    batch_size: PretrainBatch = None,
    lr: PretrainLr = None,
    ema_decay: float | None = typer.Option(
        None,
        "--ema-decay",
        help="EMA of the UNet, exported as the final weights (default 0: off).",
        rich_help_panel=OPT,
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
