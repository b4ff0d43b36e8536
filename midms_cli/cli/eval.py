"""`midms eval`: evaluate a model on a prepared split, or compare two image folders, with the
paper's metrics.

The metric choices and their help come from the registry `midms_cli.metrics.METRICS`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.table import Column, Table

from midms_cli.atomic import check_output_dir, check_output_files
from midms_cli.cli.state import STATE, emit, err_console, progress_bar
from midms_cli.devices import resolve_device
from midms_cli.errors import MidmsError
from midms_cli.metrics import METRICS

_METRIC_HELP = (
    "Metrics to compute (comma-separated or repeated; default: every one whose weights exist): "
    + ("; ".join(f"{name}: {spec.summary}" for name, spec in METRICS.items()))
)


def parse_metric_names(values: list[str] | None) -> list[str] | None:
    """`--metrics fid,swd --metrics lpips` -> ["fid", "swd", "lpips"]; unknown names are a user error."""
    if not values:
        return None
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise MidmsError(f"unknown metric {unknown[0]!r}; choose from: {', '.join(METRICS)}")
    return names


HEADLINE_KEYS = ("oracle_output_psnr", "oracle_output_l1", "part_colour_error", "swd_oracle", "swd", "fid",
                 "lpips_diversity")


SAME_MARK = " (= model)"
SAME_NOTE = "(= model): an ablation that takes nothing out of this model's sampler, so it scores as the model"


def method_label(name: str, same_as_model) -> str:
    """A method's row label; ablations given the model's numbers are marked."""
    return name + SAME_MARK if name in same_as_model else name


def _table(results: dict[str, Any]) -> Table:
    """Model evaluation: a row per method, a column per headline metric (mean ± sd over seeds).
    Folder mode: one row per number."""
    if "methods" not in results:
        table = Table("metric", "value")
        for key, value in results.items():
            table.add_row(key, _format(value))
        return table
    methods, spreads = results["methods"], results.get("sd", {})
    keys = [k for k in HEADLINE_KEYS if any(k in row for row in methods.values())]
    table = Table(Column("method", no_wrap=True), *keys)
    for name, row in methods.items():
        cells = []
        for key in keys:
            value, sd = row.get(key), spreads.get(name, {}).get(key)
            cells.append("-" if value is None else _format(value) + ("" if sd is None else f" ± {sd:.3f}"))
        table.add_row(method_label(name, results.get("same_as_model", ())), *cells)
    if results.get("same_as_model"):
        table.caption, table.caption_justify = SAME_NOTE, "left"
    return table


def _report_line(line: str) -> None:
    """One unwrapped line on stderr (a skipped metric, a warning)."""
    err_console.print(line, highlight=False, markup=False, soft_wrap=True)


def _format(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def check_model_and_split(model: Path | None, data: Path, split: str) -> None:
    """Before any work: the split holds samples, and of the condition the model was trained on."""
    from midms_cli.checkpoint import read_metadata
    from midms_cli.data.shards import read_index
    from midms_cli.pipelines.translate import MODEL_KIND, resolve_model_file

    index = read_index(data, split)
    count = index.get("count", sum(shard.get("count", 0) for shard in index["shards"]))
    if not count:
        raise MidmsError(
            f"split {split!r} of {data} holds no samples; prepare it from more source items, "
            "or choose another --split"
        )
    model_file = resolve_model_file(model)
    config = read_metadata(model_file, expected_kind=MODEL_KIND).get("config", {})
    wanted = (config.get("condition"), config.get("correspondence", {}).get("cond_channels"))
    held = (index.get("condition", {}).get("kind"), index.get("condition", {}).get("channels"))
    if None not in wanted + held and wanted != held:
        raise MidmsError(
            f"the model {model_file} takes {wanted[0]!r} conditions ({wanted[1]} channels) but "
            f"{data}/{split} holds {held[0]!r} ({held[1]} channels); evaluate it on shards prepared "
            f"with its condition, or give the model trained on these"
        )


def eval_command(
    model: Path | None = typer.Option(
        None,
        "--model",
        "-m",
        help="Model file or training run folder (default: the bundled model).",
        rich_help_panel="Model evaluation",
    ),
    data: Path | None = typer.Option(
        None,
        "--data",
        help="Prepared shards (midms prepare ... --out DIR).",
        rich_help_panel="Model evaluation",
    ),
    split: str = typer.Option(
        "val", "--split", help="Split to evaluate.", rich_help_panel="Model evaluation"
    ),
    pairs: Path | None = typer.Option(
        None,
        "--pairs",
        help="Pair list: `CONDITION_KEY EXEMPLAR_KEY` per line "
        "(default: each sample's own pair plus diversity pairs).",
        rich_help_panel="Model evaluation",
    ),
    limit: int | None = typer.Option(
        None,
        "--limit",
        min=1,
        help="Evaluate only the first N conditions.",
        rich_help_panel="Model evaluation",
    ),
    diversity: int = typer.Option(
        2,
        "--diversity",
        min=0,
        help="Extra exemplars per condition for LPIPS diversity (0: none).",
        rich_help_panel="Model evaluation",
    ),
    baselines: bool = typer.Option(
        False,
        "--baselines",
        help="Also score, on the same pairs and noise: the ablations (no confidence mask; no re-warps; the "
        "initial warp decoded without diffusion) and the baselines (exemplar copied, the condition's own "
        "photo, and on synthetic data the oracle through the first stage).",
        rich_help_panel="Model evaluation",
    ),
    batch_size: int = typer.Option(
        8, "--batch-size", min=1, help="Pairs translated at once.", rich_help_panel="Model evaluation"
    ),
    real: Path | None = typer.Option(
        None, "--real", help="Folder of real images (folder mode).", rich_help_panel="Folder mode"
    ),
    fake: Path | None = typer.Option(
        None, "--fake", help="Folder of generated images (folder mode).", rich_help_panel="Folder mode"
    ),
    size: int | None = typer.Option(
        None,
        "--size",
        min=16,
        help="Folder mode: resize images to this size (default: the first generated image's).",
        rich_help_panel="Folder mode",
    ),
    metrics: list[str] | None = typer.Option(None, "--metrics", help=_METRIC_HELP),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output folder (model mode default: eval)."),
    seed: int = typer.Option(0, "--seed", help="Seed of generation and of the metrics' random draws."),
    seeds: int = typer.Option(
        1,
        "--seeds",
        min=1,
        help="Repeat with noise seeds SEED, SEED+1, ...: numbers are the mean, with the sd over seeds.",
        rich_help_panel="Model evaluation",
    ),
) -> None:
    """Evaluate a model on a fixed pair list, or compare two image folders.

    Example: midms eval --model runs/tiny --data shards/synth --split val --limit 64 --out eval/

    Example: midms eval --data shards/synth --baselines --seeds 3 --metrics swd,oracle

    Example: midms eval --real photos/ --fake outputs/ --metrics fid,swd
    """
    chosen = parse_metric_names(metrics)
    if out is not None or real is None:
        check_output_dir(out or Path("eval"), "--out")  # before any work; a notice if results exist
        check_output_files([(out or Path("eval")) / "results.json"], "--out")
    device = resolve_device(STATE.device)
    if real is not None or fake is not None:
        if real is None or fake is None:
            raise MidmsError("folder mode needs both --real DIR and --fake DIR")
        if model is not None or data is not None:
            raise MidmsError("use either --model/--data or --real/--fake, not both")
        if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
            raise MidmsError("folder mode (--real/--fake) runs in one process; run it without torchrun")
        from midms_cli.pipelines.evaluate import evaluate_folders

        outcome = evaluate_folders(
            real, fake, metrics=chosen, out_dir=out, seed=seed, size=size, device=device, report=_report_line
        )
        emit({"results": outcome["results"], "protocol": outcome["protocol"]}, _table(outcome["results"]))
        return
    if data is None:
        raise MidmsError("give --data DIR (prepared shards) to evaluate a model, or --real DIR --fake DIR")
    check_model_and_split(model, data, split)
    from midms_cli import distributed
    from midms_cli.pipelines.evaluate import evaluate_model
    from midms_cli.pipelines.translate_parallel import rank_device

    # Under torchrun (WORLD_SIZE > 1) the processes share the batches; the main one reports.
    parallel = distributed.init()
    if parallel:
        device = rank_device(STATE.device)
    try:
        with progress_bar(
            TextColumn("translating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            transient=True, disable=not distributed.is_main(),
        ) as progress:  # fmt: skip
            task = progress.add_task("eval", total=None)
            outcome = evaluate_model(
                model,
                data,
                split,
                out or Path("eval"),
                chosen,
                limit,
                seed,
                baselines,
                seeds=seeds,
                pairs_path=pairs,
                diversity=diversity,
                batch_size=batch_size,
                device=device,
                report=_report_line if distributed.is_main() else lambda line: None,
                progress=lambda n: progress.advance(task, n),
                on_start=lambda total: progress.update(task, total=total),
            )
    except BaseException:
        distributed.cleanup(finished=False)
        raise
    distributed.cleanup()
    if outcome["results"] is None:  # another process of a data-parallel run reports
        return
    emit(outcome, _table(outcome["results"]))
    if not STATE.json:
        err_console.print(
            f"wrote {outcome['out_dir']}/results.json, protocol.json and report.html", highlight=False
        )


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
