"""What a training run writes besides checkpoints: config.json, JSON-lines logs, sample grids.

Logs are appended (a crash loses at most the line being written) and cut back to the resumed step;
the temporary files of a killed run are removed before a new one starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from midms_cli.atomic import remove_stale_temporaries, write_text
from midms_cli.errors import MidmsError

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
SAMPLES_DIR = "samples"
# Per-rank trace of data keys and parameter checksums (only with LoopOptions.trace; used by tests).
TRACE_FILE = "trace-rank{rank}.jsonl"


def parameter_checksum(module: nn.Module) -> float:
    """Sum of all parameters in float64: equal across ranks iff DDP kept the replicas in sync."""
    with torch.no_grad():
        return float(sum(p.detach().double().sum() for p in module.parameters()))


def sample_keys(batch: dict[str, Any]) -> list[str]:
    return [str(m.get("__key__", m.get("key", ""))) for m in batch.get("meta", [])]


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def sample_grid(columns: list[torch.Tensor], max_rows: int = 4) -> torch.Tensor:
    """(3, rows*H, cols*W) grid: one row per sample, one column per tensor (each (B, C, H, W) in [-1, 1])."""
    shown = []
    for column in columns:
        column = column[:max_rows].detach().float().cpu()
        if column.shape[1] == 1:
            column = column.expand(-1, 3, -1, -1)
        shown.append(torch.nan_to_num(column[:, :3], nan=0.0).clamp(-1, 1))
    rows = [torch.cat([c[i] for c in shown], dim=2) for i in range(shown[0].shape[0])]
    return torch.cat(rows, dim=1)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """One JSON line, flushed (a log is appended to, not rewritten; a crash loses at most this line)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop records logged after `last_step` (they belong to steps a resumed run will redo)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    write_text(path, "".join(k + "\n" for k in kept))


def remove_run_temporaries(out: Path) -> None:
    """Temporary files a killed run left in its folder and sample folder (main process, before work)."""
    remove_stale_temporaries(out)
    remove_stale_temporaries(Path(out) / SAMPLES_DIR)


def write_run_config(out: Path, config: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    remove_run_temporaries(out)
    write_text(out / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_run_config(out: Path) -> dict[str, Any] | None:
    path = Path(out) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MidmsError(f"{path} is not valid JSON ({exc.msg}); fix or delete it") from None
    except UnicodeDecodeError:
        raise MidmsError(f"{path} is not UTF-8 text; fix or delete it") from None
    if not isinstance(config, dict):
        raise MidmsError(f"{path} holds a JSON {type(config).__name__}, not a run config; fix or delete it")
    return config
