"""Atomic file writes: a temporary file beside the target, fsync, then rename.

A reader never sees a half-written file, and a crash leaves the previous version in place; the
temporary files a killed process leaves behind are recognised by name and removed by the next run
(`remove_stale_temporaries`). A write that fails for a reason the user can fix (disk full,
read-only or missing folder, a directory in the way) is one MidmsError naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from midms_cli.errors import MidmsError

# What mkstemp makes from prefix ".{name}." and suffix ".tmp{ext}": random characters between.
_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp(\.[^/]*)?$")

# Errors of the environment rather than of midms: each becomes one line with what to do.
_FIXABLE = {
    errno.ENOSPC: "the disk is full; free space or choose another location",
    errno.EDQUOT: "the disk quota is exhausted; free space or choose another location",
    errno.EROFS: "the file system is read-only; choose another location",
    errno.EACCES: "permission denied; choose a folder you can write to",
    errno.EPERM: "permission denied; choose a folder you can write to",
    errno.EISDIR: "a directory is in the way; choose another name",
    errno.ENOTDIR: "a file is in the way where a folder is needed; choose another location",
    errno.ENAMETOOLONG: "the name is too long; choose a shorter one",
    errno.ENOENT: "the folder vanished while writing; choose another location",
    errno.EEXIST: "a file is in the way where a folder is needed; choose another location",
}

# Fault injection for the crash tests: called as hook(event, path) at each write boundary,
# event "open" (temporary file created, empty), "written" (complete, not yet renamed) or "renamed".
FaultHook = Callable[[str, Path], None]
_fault_hook: FaultHook | None = None


def set_fault_hook(hook: FaultHook | None) -> None:
    """Install (or with None remove) the write-boundary hook; tests use it to stop a run at a boundary."""
    global _fault_hook
    _fault_hook = hook


def _boundary(event: str, path: Path) -> None:
    if _fault_hook is not None:
        _fault_hook(event, path)


def is_fixable(exc: BaseException) -> bool:
    """True for an OSError the user can fix (disk full, permissions, a file in the way)."""
    return isinstance(exc, OSError) and exc.errno in _FIXABLE


def fixable_reason(exc: BaseException) -> str | None:
    """What to do about an OSError the user can fix, or None for any other error."""
    return _FIXABLE.get(exc.errno) if isinstance(exc, OSError) else None


def write_error(path: str | os.PathLike, exc: OSError) -> MidmsError:
    """One line for a failed write: the file and what to do about it."""
    reason = _FIXABLE.get(exc.errno) or (exc.strerror or type(exc).__name__)
    return MidmsError(f"cannot write {path}: {reason}")


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
    if target.is_dir():
        raise MidmsError(f"cannot write {target}: it is a directory; choose a file name")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=".tmp" + target.suffix, dir=target.parent
        )
    except OSError as exc:
        if is_fixable(exc):
            raise write_error(target, exc) from exc
        raise
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _boundary("open", tmp)
        yield tmp
        # mkstemp creates the file private (0600), and writers that replace the file (safetensors
        # does) may too: the finished file gets ordinary permissions.
        os.chmod(tmp, _default_mode())
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        _boundary("written", tmp)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if is_fixable(exc):
            raise write_error(target, exc) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _boundary("renamed", target)


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


# --------------------------------------------------------------------------------------------
# Leftovers of killed runs


def is_temporary(path: Path) -> bool:
    """True for a temporary file of `atomic_path` (`.NAME.xxxxxxxx.tmp[.ext]`)."""
    return bool(_TEMPORARY.match(path.name))


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed writer left in `directory` (not recursive); returns them.

    Call it only where no other process is writing at the same time (a run's own folders, before
    its work starts).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in directory.iterdir():
        if is_temporary(entry) and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


# --------------------------------------------------------------------------------------------
# Output paths, checked before any work


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _check_writable_parent(path: Path, option: str) -> None:
    """The folder that will hold `path` can be created and written (a file in the way is refused)."""
    ancestor = _nearest_existing(path.parent)
    if not ancestor.is_dir():
        raise MidmsError(f"{option} {path}: {ancestor} is a file, not a folder; choose another location")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise MidmsError(f"{option} {path}: cannot write in {ancestor} (permission denied or read-only)")


def check_output_file(path: str | os.PathLike, option: str = "output", *, notice: bool = True) -> bool:
    """Refuse an output file path that cannot be written, before any work; True when it exists.

    An existing file is replaced when the command finishes; with `notice` that is said on stderr.
    """
    path = Path(path)
    if path.is_dir():
        raise MidmsError(f"{option} {path} is a directory; name a file")
    _check_writable_parent(path, option)
    exists = path.exists()
    if exists and notice:
        _notice(f"note: {path} exists and will be replaced")
    return exists


def _notice(message: str) -> None:
    """One line on stderr, from the first process only when torchrun started several (RANK)."""
    if os.environ.get("RANK", "0") != "0":
        return
    import sys

    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def check_output_files(paths: list[Path], option: str = "output") -> int:
    """`check_output_file` for every path of a batch, with one notice for all the existing ones."""
    existing = [Path(p) for p in paths if check_output_file(p, option, notice=False)]
    if existing:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        verb = "exist" if more else "exists"
        _notice(f"note: {existing[0]}{more} {verb} and will be replaced")
    return len(existing)


def check_output_dir(path: str | os.PathLike, option: str = "--out") -> None:
    """Refuse an output folder that is a file or cannot be created or written, before any work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MidmsError(f"{option} {path} is a file; name a folder (it is created when missing)")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise MidmsError(f"{option} {path}: cannot write in it (permission denied or read-only)")
        return
    _check_writable_parent(path, option)


def _entries(path: Path) -> set[Path]:
    return set(path.iterdir()) if path.is_dir() else set()


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def undo_on_failure(directory: str | os.PathLike, keep: Callable[[Path], bool]) -> Iterator[None]:
    """On an exception, remove what this block added to `directory` (the folder too when it did not
    exist), unless the folder holds a file worth resuming from (`keep(file)` true for any file in it).

    A bad input or a full disk then leaves nothing behind, while a run that got as far as a
    checkpoint or a finished shard stays resumable.
    """
    directory = Path(os.path.abspath(directory))
    created = []  # the folder and those of its parents that do not exist yet, deepest first
    missing = directory
    while not missing.exists() and missing.parent != missing:
        created.append(missing)
        missing = missing.parent
    before = _entries(directory)
    try:
        yield
    except BaseException:
        if directory.is_dir() and not any(keep(f) for f in directory.rglob("*") if f.is_file()):
            for entry in _entries(directory) - before:
                _remove(entry)
            for folder in created:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty: another process may have put files there
        raise
