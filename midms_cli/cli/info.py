"""`midms info` and `midms datasets`: what is installed and where things are looked for."""

from __future__ import annotations

import platform

import torch
import typer
from rich.table import Table

import midms_cli
from midms_cli.cli.state import STATE, emit
from midms_cli.data.registry import discover
from midms_cli.devices import resolve_device
from midms_cli.paths import midms_home, weights_dir


def _weights_found() -> list[str]:
    directory = weights_dir()
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.glob("*.safetensors"))


def info() -> None:
    """Versions, device, CPU threads, cache directory, dataset plugins and weights found.

    Example: midms info --json
    """
    device = resolve_device(STATE.device)
    plugins = discover()
    result = {
        "package": "midms",
        "version": midms_cli.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "cuda_available": torch.cuda.is_available(),
        "cpu_threads": torch.get_num_threads(),
        "cache_dir": str(midms_home()),
        "dataset_plugins": sorted(plugins.plugins),
        "broken_plugins": plugins.broken,
        "weights": _weights_found(),
    }
    table = Table(show_header=False, box=None)
    for key, value in result.items():
        if isinstance(value, list):
            value = ", ".join(value) or "none"
        elif isinstance(value, dict):
            value = "; ".join(f"{k}: {v}" for k, v in value.items()) or "none"
        table.add_row(f"[bold]{key}[/bold]", str(value))
    emit(result, table)


def datasets() -> None:
    """List the installed dataset plugins (entry-point group `midms.datasets`).

    Example: midms datasets
    """
    found = discover()
    rows = []
    for name, plugin in found.plugins.items():
        condition = getattr(plugin, "condition", None)
        rows.append({
            "name": name,
            "description": str(getattr(plugin, "description", "")),
            "condition": getattr(condition, "kind", None),
            "channels": getattr(condition, "channels", None),
        })
    result = {"plugins": rows, "broken": found.broken}
    table = Table("name", "condition", "description")
    for row in rows:
        cond = f"{row['condition']} ({row['channels']} ch)" if row["condition"] else ""
        table.add_row(row["name"], cond, row["description"])
    for name, reason in found.broken.items():
        table.add_row(f"[red]{name}[/red]", "[red]broken[/red]", reason)
    if not rows and not found.broken:
        emit(result, "no dataset plugins installed")
    else:
        emit(result, table)


def register(app: typer.Typer) -> None:
    app.command("info")(info)
    app.command("datasets")(datasets)
