"""Resumable HTTP downloads with a rich progress bar on stderr (the one progress library of midms)."""

from __future__ import annotations

import http.client
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from midms_cli.errors import MidmsError

CHUNK = 1 << 20


def download_once(url: str, part: Path, progress: Callable[[int, int | None], None]) -> bool:
    """Append the rest of `url` to `part` (HTTP Range when part is non-empty); True when complete."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "midms"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code == 416:  # the part file already holds the whole resource
            return True
        raise MidmsError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise MidmsError(f"cannot reach {url}: {exc}") from exc
    with response:
        if have and response.status != 206:  # the server ignored Range: start again
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        received = have
        progress(received, total)
        with open(part, "ab" if have else "wb") as handle:
            try:
                for block in iter(lambda: response.read(CHUNK), b""):
                    handle.write(block)
                    received += len(block)
                    progress(received, total)
            except (http.client.IncompleteRead, ConnectionError, TimeoutError) as exc:
                if isinstance(exc, http.client.IncompleteRead):
                    handle.write(exc.partial)
                return False
    return total is None or received >= total


@contextmanager
def download_progress(label: str) -> Iterator[Callable[[int, int | None], None]]:
    """A byte counter on stderr (size, speed, time left), yielding update(received, total).

    Off when stderr is not a terminal: rich cannot animate a bar in a pipe or a log file.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(label, total=None)

        def update(received: int, total: int | None) -> None:
            bar.update(task, completed=received, total=total)

        yield update
