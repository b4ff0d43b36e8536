"""`midms weights export-ldm`: a model's UNet and first stage as a latent-diffusion checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from midms_cli.cli.state import emit


def export_ldm_command(
    model: Path = typer.Argument(
        ..., help="A midms model file or training run folder (or an imported LDM file)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for model.ckpt and config.yaml."),
) -> None:
    """Export the UNet and first stage in the original latent-diffusion layout (the inverse of import-ldm).

    The correspondence networks have no place in that layout and are left out.
    Example: midms weights export-ldm runs/celeba-e2e -o ldm-export/
    """
    from midms_cli.ldm_export import export_ldm

    result = export_ldm(model, out)
    table = Table(show_header=False, box=None)
    table.add_row("[bold]checkpoint[/bold]", result["checkpoint"])
    table.add_row("[bold]config[/bold]", result["config"])
    for prefix, count in result["parameters"].items():
        table.add_row(f"[bold]{prefix}[/bold]", f"{count:,} parameters")
    emit(result, table)


def register(weights_app: typer.Typer) -> None:
    weights_app.command("export-ldm")(export_ldm_command)
