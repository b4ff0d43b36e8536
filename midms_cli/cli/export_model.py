"""`midms weights export`: a model file or training run as one inference file."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from midms_cli.cli.state import emit


def export_command(
    model: Path = typer.Argument(..., help="A midms model file or training run folder."),
    out: Path = typer.Option(..., "--out", "-o", help="The model file to write (.safetensors)."),
    half: bool = typer.Option(False, "--half", help="Store the weights in float16 (half the size)."),
    sampling: list[str] | None = typer.Option(
        None,
        "--sampling",
        help="Sampler setting stored in the file, KEY=VALUE with a JSON value (repeatable): e.g. tau=0.03, "
        "rewarp_positions=[].",
    ),
    trained_by: str | None = typer.Option(
        None, "--trained-by", help="How the model was trained, stored in the file (default: the source's)."
    ),
) -> None:
    """Export a model or run as one model file for `midms translate`, `eval` and `demo --model`.

    The file records its source (name, sha256, command) and the sampler it ships.
    Example: midms weights export runs/celeba-e2e -o celeba.safetensors --half --sampling tau=0.03
    """
    from midms_cli.model_export import export_model, parse_sampling

    result = export_model(
        model, out, half=half, sampling=parse_sampling(sampling or []), trained_by=trained_by
    )
    table = Table(show_header=False, box=None)
    table.add_row("[bold]model[/bold]", result["model"])
    table.add_row("[bold]source[/bold]", result["source"])
    table.add_row("[bold]size[/bold]", f"{result['megabytes']} MB, {result['weights_dtype']} weights")
    emit(result, table)


def register(weights_app: typer.Typer) -> None:
    weights_app.command("export")(export_command)
