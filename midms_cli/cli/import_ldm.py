"""`midms weights import-ldm`: a latent-diffusion config.yaml + model.ckpt as a midms safetensors file."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from midms_cli.atomic import check_output_file
from midms_cli.cli.state import emit


def import_ldm_command(
    config: Path = typer.Option(..., "--config", help="The model's latent-diffusion config.yaml."),
    ckpt: Path = typer.Option(..., "--ckpt", help="The matching model.ckpt (read with weights_only=True)."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the midms .safetensors file."),
    ema: bool = typer.Option(
        False,
        "--ema/--no-ema",
        help="Take the UNet from the EMA copy (model_ema.*) instead of the regular weights. Default "
        "--no-ema: MIDMs' official code fine-tunes from the regular weights; LDM's own sampler uses EMA.",
    ),
) -> None:
    """Import a latent-diffusion model (full LDM or first stage only) with every key and shape checked.

    Example: midms weights import-ldm --config config.yaml --ckpt model.ckpt --out ldm-celeba256.safetensors
    """
    check_output_file(out, "--out")  # before any work
    from midms_cli.ldm_import import import_ldm

    result = import_ldm(config, ckpt, out, ema=ema)
    table = Table(show_header=False, box=None)
    table.add_row("[bold]written[/bold]", result["out"])
    table.add_row("[bold]layout[/bold]", result["layout"])
    table.add_row("[bold]unet weights[/bold]", "EMA" if ema else "regular (non-EMA)")
    for prefix, count in result["parameters"].items():
        table.add_row(f"[bold]{prefix}[/bold]", f"{count:,} parameters")
    emit(result, table)


def register(weights_app: typer.Typer) -> None:
    weights_app.command("import-ldm")(import_ldm_command)
