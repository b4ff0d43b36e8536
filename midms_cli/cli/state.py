"""Global CLI options shared by every command (set once by the app callback)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)


@dataclass
class CliState:
    json: bool = False
    debug: bool = False
    verbose: int = 0
    device: str = "auto"


STATE = CliState()

# Progress bars and logs go to stderr; results go to stdout.
err_console = Console(stderr=True)
out_console = Console()


def emit(result: dict[str, Any], human: Any | None = None) -> None:
    """Print a command's result: one JSON object with --json, else `human` (or the dict) on stdout."""
    if STATE.json:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
        sys.stdout.flush()
    elif human is not None:
        out_console.print(human)
    else:
        for key, value in result.items():
            out_console.print(f"[bold]{key}[/bold]: {value}")


def log(message: str, level: int = 0) -> None:
    """A log line on stderr, shown when -v was given at least `level` times."""
    if STATE.verbose >= level:
        err_console.print(message, highlight=False)


def progress_bar(*columns: ProgressColumn | str, transient: bool = False, disable: bool = False) -> Progress:
    """A rich progress bar on stderr; off with --json and when stderr is not a terminal.

    Rich cannot animate a bar in a pipe: it would only print the last state when the bar stops,
    which after a user error adds a stray line before the one-line message.
    """
    if not columns:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    return Progress(
        *columns,
        console=err_console,
        transient=transient,
        disable=disable or STATE.json or not err_console.is_terminal,
    )
