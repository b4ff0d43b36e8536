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
from midms_cli.cli.eval import SAME_NOTE, method_label
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


def methods_table(summary: dict[str, Any]) -> Table:
    """A row per method (model, ablations, baselines), the headline metrics as columns."""
    methods, spreads = summary["methods"], summary.get("sd") or {}
    keys = [k for k in ("oracle_output_psnr", "part_colour_error", "swd_oracle") if
            any(k in row for row in methods.values())]  # fmt: skip
    titles = {"oracle_output_psnr": "oracle PSNR dB (up)", "part_colour_error": "colour error (down)",
              "swd_oracle": "SWD vs oracles (down)"}  # fmt: skip
    table = Table(title=f"midms demo: {Path(summary['model']).name} on {summary['pairs']} new pairs",
                  title_justify="left")  # fmt: skip
    table.add_column("method", no_wrap=True)
    for key in keys:
        table.add_column(titles[key], justify="right")
    for name, row in methods.items():
        cells = []
        for key in keys:
            sd = spreads.get(name, {}).get(key)
            cells.append(
                "-" if key not in row else f"{row[key]:.3f}" + ("" if sd is None else f" ± {sd:.3f}")
            )
        table.add_row(method_label(name, summary.get("same_as_model", ())), *cells)
    table.caption = f"grid: {summary['grid']}   report: {summary['report']}   ({summary['seconds']:.0f} s)"
    if summary.get("same_as_model"):
        table.caption += f"\n{SAME_NOTE}"
    table.caption_justify = "left"
    return table


def demo_command(
    out: Path | None = typer.Option(
        None,
        "--out",
        "-o",
        help="Output folder (default: midms-demo, or midms-demo-PROFILE with --train; a rerun of a "
        "training demo skips finished stages).",
    ),
    train: bool = typer.Option(False, "--train", help="Train your own model through every stage instead."),
    quick: bool = typer.Option(
        False, "--quick", help="With --train: a few steps per stage (a smoke test; its outputs are noise)."
    ),
    profile: str = typer.Option(
        "full",
        "--profile",
        help="With --train: " + "; ".join(f"{name}: {p.summary}" for name, p in PROFILES.items()) + ".",
    ),
    model: Path | None = typer.Option(
        None, "--model", "-m", help="Without --train: the model to show (default: the bundled model)."
    ),
    pairs: int = typer.Option(
        48, "--pairs", min=2, help="Without --train: new pairs generated and evaluated."
    ),
    seeds: int = typer.Option(1, "--seeds", min=1, help="Without --train: noise seeds of the evaluation."),
    seed: int = typer.Option(0, "--seed", help="Seed of data generation (and of training with --train)."),
) -> None:
    """Show MIDMs translating: the bundled model on freshly generated synthetic face pairs.

    Writes a captioned grid (condition | exemplar | output | oracle) and an evaluation against the
    ablations and the copy / source baselines. With --train, runs the whole pipeline on synthfaces
    with the tiny preset instead: prepare, pretrain, warm-up, train, translate, evaluate, export.

    Example: midms demo

    Example: midms demo --train --quick
    """
    if quick or profile != "full":
        train = True  # --quick and --profile only make sense for a training run
    if quick:
        if profile not in ("full", "quick"):
            raise MidmsError("give either --quick or --profile, not both")
        profile = "quick"
    if not train:
        from midms_cli.pipelines.showcase import ShowcaseOptions, run_showcase

        out = out or Path("midms-demo")
        check_output_dir(out)  # before any work

        columns = (TextColumn("[bold]evaluate"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with progress_bar(*columns, transient=True) as progress:
            task = progress.add_task("evaluate", total=pairs * seeds)
            summary = run_showcase(ShowcaseOptions(
                out=out, model=model, pairs=pairs, seed=seed, seeds=seeds,
                device=STATE.device, log=lambda message: err_console.print(message, highlight=False),
                progress=lambda n: progress.advance(task, n),
            ))  # fmt: skip
        emit(summary, methods_table(summary))
        return
    if model is not None:
        raise MidmsError("--model shows an existing model; it cannot be combined with --train")
    if profile not in PROFILES:
        raise MidmsError(f"--profile {profile!r}: choose one of {', '.join(PROFILES)}")
    out = out or Path(f"midms-demo-{profile}")
    check_output_dir(out)  # before any work
    if profile == "quick":
        err_console.print("quick profile: a few optimizer steps per stage, to check that the pipeline runs; "
                          "expect noise, not faces", highlight=False)  # fmt: skip
    options = DemoOptions(out=out, profile=PROFILES[profile], seed=seed, device=STATE.device,
                          show_progress=not STATE.json, bar=rich_bar,
                          log=lambda message: err_console.print(message, highlight=False))  # fmt: skip
    summary = run_demo(options)
    emit(summary, summary_table(summary))


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
