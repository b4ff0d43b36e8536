"""Atomic file writes: a temporary file beside the target, fsync, then rename.

A reader never sees a half-written file, and a crash leaves the previous version in place.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def _default_mode() -> int:
    """The permissions a plain open() would give a new file (0o666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path for writers that want a file name (e.g. PIL, safetensors); renamed on success."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=".tmp" + target.suffix, dir=target.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates the file private (0600), and writers that replace the file (safetensors
        # does) may too: the finished file gets ordinary permissions.
        os.chmod(tmp, _default_mode())
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file for writing; on success it replaces `path` atomically."""
    # The handle is closed (flushed) before atomic_path fsyncs and renames the file.
    encoding = None if "b" in mode else "utf-8"  # text is always UTF-8, whatever the locale
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as handle:
        yield handle


def write_text(path: str | os.PathLike, text: str) -> None:
    """Replace `path` atomically with `text` in UTF-8."""
    with atomic_write(path, "w") as handle:
        handle.write(text)
