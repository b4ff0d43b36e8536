"""Atomic writes: a failed write keeps the previous file and leaves no temporary file behind."""

from __future__ import annotations

import os

import pytest

from midms_cli.atomic import atomic_path, atomic_write, write_text


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_write_text_replaces_the_file_in_utf8(tmp_path):
    target = tmp_path / "sub" / "notes.txt"
    write_text(target, "first")
    write_text(target, "zweite Ä")
    assert target.read_bytes() == "zweite Ä".encode()
    assert _leftovers(target.parent) == []


@pytest.mark.parametrize("mode", ["wb", "w"])
def test_a_failing_writer_keeps_the_previous_content(tmp_path, mode):
    target = tmp_path / "data.bin"
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_write(target, mode) as handle:
            handle.write(b"half" if "b" in mode else "half")
            raise RuntimeError("crash")
    assert target.read_bytes() == b"previous"
    assert _leftovers(tmp_path) == []


def test_atomic_path_is_a_sibling_temp_file_renamed_on_success(tmp_path):
    target = tmp_path / "image.png"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".png") and tmp != target
        tmp.write_bytes(b"png")
        assert not target.exists()  # nothing visible before the rename
    assert target.read_bytes() == b"png"
    assert _leftovers(tmp_path) == []


def test_finished_files_get_ordinary_permissions_not_the_private_temp_mode(tmp_path):
    umask = os.umask(0o022)
    try:
        write_text(tmp_path / "out.txt", "x")
    finally:
        os.umask(umask)
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == 0o644


def test_a_writer_that_recreates_the_file_privately_still_leaves_ordinary_permissions(tmp_path):
    import torch

    from midms_cli.checkpoint import save_checkpoint

    umask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "replaced.bin") as tmp:
            tmp.unlink()
            os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600))  # as a write-then-rename writer would
        save_checkpoint(tmp_path / "model.safetensors", {"w": torch.zeros(2)}, {}, "midms")
    finally:
        os.umask(umask)
    assert (tmp_path / "replaced.bin").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o644
