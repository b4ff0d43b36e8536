"""`midms weights import-midms`: the released MIDMs checkpoint as a midms model file."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from midms_cli.atomic import check_output_file
from midms_cli.cli.state import emit
from midms_cli.conditions import CONDITIONS
from midms_cli.errors import MidmsError


def import_midms_command(
    checkpoint: Path = typer.Argument(..., help="The released checkpoint, e.g. midms_celebA_finetuned.pth."),
    ldm: Path = typer.Option(
        ..., "--ldm", help="The LDM it was fine-tuned from (`midms weights import-ldm`)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the midms model file (.safetensors)."),
    condition: str | None = typer.Option(
        None, "--condition", help=f"Condition kind ({', '.join(CONDITIONS)}); default from the channel count."
    ),
) -> None:
    """Import the released MIDMs weights (read with weights_only=True; every key checked).

    Example: midms weights import-midms midms_celebA.pth --ldm ldm.safetensors --out celeba.safetensors
    """
    if condition is not None and condition not in CONDITIONS:
        raise MidmsError(f"--condition {condition!r}: choose one of {', '.join(CONDITIONS)}")
    check_output_file(out, "--out")  # before any work
    from midms_cli.midms_import import import_midms

    result = import_midms(checkpoint, ldm, out, condition)
    table = Table(show_header=False, box=None)
    table.add_row("[bold]written[/bold]", result["out"])
    table.add_row("[bold]condition[/bold]", result["condition"])
    for prefix, count in result["parameters"].items():
        table.add_row(f"[bold]{prefix}[/bold]", f"{count:,} parameters")
    emit(result, table)


def register(weights_app: typer.Typer) -> None:
    weights_app.command("import-midms")(import_midms_command)
