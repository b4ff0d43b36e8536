"""What the training commands share: their common options and the wrapper that runs a training.

`run_training` checks the run directory before any work, runs in the torchrun process group when
there is one, removes a run directory that failed before its first checkpoint, and turns an
interrupted run into exit code 128 + the signal (130 for Ctrl-C).
"""

from __future__ import annotations

import contextlib
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
from midms_cli.errors import MidmsError
from midms_cli.pipelines.loop import LoopResult
from midms_cli.presets import PRESETS

PRESET_HELP = f"Model preset: {', '.join(PRESETS)}."
RUN = "Run"
OPT = "Optimisation"
LOG = "Logging and checkpoints"

# Options shared by several commands, declared once (type + typer.Option); defaults stay in the
# signatures. None means "keep the value of the preset or config".
Data = Annotated[
    Path, typer.Option("--data", help="Prepared shards (midms prepare ... --out DIR).", rich_help_panel=RUN)
]
Out = Annotated[
    Path, typer.Option("--out", "-o", help="Run directory (resumed when it exists).", rich_help_panel=RUN)
]
Seed = Annotated[int | None, typer.Option("--seed", help="Seed (default 2021).", rich_help_panel=RUN)]
Workers = Annotated[
    int, typer.Option("--workers", min=0, help="DataLoader workers per process.", rich_help_panel=RUN)
]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Print the resolved config JSON and stop.")]
Trace = Annotated[bool, typer.Option("--trace", hidden=True)]
Preset = Annotated[str, typer.Option("--preset", help=PRESET_HELP, rich_help_panel=RUN)]
# pretrain autoencoder | diffusion (defaults from PretrainConfig)


def command_line() -> str:
    return " ".join(["midms", *sys.argv[1:]])


def print_config(config: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """Leave the torchrun process group on the way out (success or error), so ranks exit cleanly."""
    try:
        yield
    except BaseException:
        distributed.cleanup(finished=False)
        raise
    distributed.cleanup()


def emit_result(result: LoopResult, out: Path, what: str) -> None:
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


def resumable(path: Path) -> bool:
    """A file worth keeping after a failure: a checkpoint or training state to resume from."""
    return path.name.startswith(("ckpt-", "state-")) and path.suffix == ".safetensors"


def run_training(
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
    undo = undo_on_failure(out, resumable) if distributed.is_main() else contextlib.nullcontext()
    with process_group(), undo:
        result = run(
            data,
            out,
            *args,
            device_name=STATE.device,
            num_workers=workers,
            extra={"command": command_line()},
            trace=trace,
            progress=not STATE.json,
            **kwargs,
        )
        emit_result(result, out, what)
    if result.interrupted:
        raise typer.Exit(128 + (result.signal or 2))


def check_finite(name: str, value: Any) -> None:
    """NaN or infinity given on the command line is refused by name (comparisons let NaN through)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise MidmsError(f"{name}: must be a finite number, got {value}")
