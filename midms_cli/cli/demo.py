"""`midms demo`: the whole pipeline on generated synthfaces, tiny, on this machine; resumable."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from midms_cli.atomic import check_output_dir
from midms_cli.cli.state import STATE, emit, err_console, progress_bar
from midms_cli.errors import MidmsError
from midms_cli.pipelines.demo import PROFILES, DemoOptions, run_demo


@contextlib.contextmanager
def rich_bar(description: str, total: int) -> Iterator[Any]:
    """A progress bar on stderr for the stages that have none of their own (prepare, translate, evaluate)."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with progress_bar(*columns) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)


def _numbers(numbers: dict[str, Any]) -> str:
    return ", ".join(f"{key} {value}" for key, value in numbers.items() if key != "steps" or value)


def summary_table(summary: dict[str, Any]) -> Table:
    """Stage | time | key numbers, and where the results are."""
    table = Table(title=f"midms demo ({summary['profile']}) in {summary['out']}", title_justify="left")
    table.add_column("stage")
    table.add_column("time", justify="right")
    table.add_column("key numbers")
    for record in summary["stages"]:
        seconds = f"{record['seconds']:.0f} s" + (" (earlier run)" if record["skipped"] else "")
        table.add_row(record["stage"], seconds, _numbers(record["numbers"]))
    table.add_row("total", f"{summary['seconds']:.0f} s", "")
    table.caption = f"grid: {summary['grid']}   report: {summary['report']}   model: {summary['model']}"
    table.caption_justify = "left"
    return table


def demo_command(
    out: Path = typer.Option(Path("midms-demo"), "--out", "-o",
                             help="Output folder (a rerun with the same folder skips finished stages)."),
    quick: bool = typer.Option(False, "--quick", help="Smallest settings, same code path (about 3 minutes)."),
    profile: str = typer.Option("full", "--profile",
                                help="; ".join(f"{name}: {p.summary}" for name, p in PROFILES.items()) + "."),
    seed: int = typer.Option(0, "--seed", help="Seed of data generation and training."),
) -> None:
    """Run the whole pipeline on synthfaces with the tiny preset: prepare, pretrain, warm-up, train,
    translate a grid, evaluate, export.

    Stages: prepare, autoencoder, diffusion, warmup, train, translate, evaluate, export.
    Example: midms demo --quick --out /tmp/demo
    """
    if quick:
        if profile not in ("full", "quick"):
            raise MidmsError("give either --quick or --profile, not both")
        profile = "quick"
    if profile not in PROFILES:
        raise MidmsError(f"--profile {profile!r}: choose one of {', '.join(PROFILES)}")
    check_output_dir(out)  # before any work
    options = DemoOptions(out=out, profile=PROFILES[profile], seed=seed, device=STATE.device,
                          show_progress=not STATE.json, bar=rich_bar,
                          log=lambda message: err_console.print(message, highlight=False))
    summary = run_demo(options)
    emit(summary, summary_table(summary))


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
