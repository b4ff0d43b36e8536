"""`midms info` and `midms datasets`: what is installed and where things are looked for."""

from __future__ import annotations

import platform
from typing import Any

import torch
import typer
from rich.table import Table

import midms_cli
from midms_cli.cli.state import STATE, emit
from midms_cli.data.plugin import default_options
from midms_cli.data.registry import discover
from midms_cli.devices import resolve_device
from midms_cli.paths import midms_home
from midms_cli.weights import weight_status


def _weights_found() -> list[str]:
    """Registry artefacts that have been added (see `midms weights list` for the missing ones)."""
    return [row["name"] for row in weight_status() if row["present"]]


def _bundled_model() -> dict[str, Any] | None:
    """The model `translate` and `eval` use without --model: where it is and what it translates."""
    from midms_cli.checkpoint import read_metadata
    from midms_cli.pipelines.translate import BUNDLED_MODEL, MODEL_KIND

    if not BUNDLED_MODEL.is_file():
        return None
    config = read_metadata(BUNDLED_MODEL, expected_kind=MODEL_KIND).get("config", {})
    return {
        "path": str(BUNDLED_MODEL),
        "condition": config.get("condition"),
        "image_size": config.get("image_size"),
    }


def info() -> None:
    """Versions, device, CPU threads, cache directory, dataset plugins, models and weights found.

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
        "bundled_model": _bundled_model(),
        "weights": _weights_found(),
    }
    table = Table(show_header=False, box=None)
    for key, value in result.items():
        if key == "weights":  # the bundled model needs none; `weights list` says what each is for
            value = ", ".join(value) or "none added (see `midms weights list`)"
        elif key == "bundled_model":
            value = "none" if value is None else (
                f"{value['condition']} -> image, {value['image_size']} px, at {value['path']} "
                "(used when --model is not given)"
            )
        elif isinstance(value, list):
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
        try:  # the condition of the plugin's default options (variants may change it)
            condition = plugin.condition_spec(default_options(plugin))
        except Exception:  # a plugin bug must not hide the others
            condition = None
        rows.append({
            "name": name,
            "description": str(getattr(plugin, "description", "")),
            "version": str(getattr(plugin, "version", "")),
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
