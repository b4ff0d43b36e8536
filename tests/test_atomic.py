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


def test_stale_temporaries_are_recognised_by_name_and_removed(tmp_path):
    from midms_cli.atomic import is_temporary, remove_stale_temporaries

    with atomic_path(tmp_path / "ckpt-00000001.safetensors") as tmp:
        assert is_temporary(tmp)
        kept_name = tmp.name
    stale = [tmp_path / kept_name, tmp_path / ".latest.a1b2c3d4.tmp", tmp_path / ".config.json.x_9.tmp.json"]
    for path in stale:
        path.write_bytes(b"partial")
    ordinary = [tmp_path / name for name in ("latest", ".hidden", "notes.tmp", "ckpt-00000001.safetensors")]
    for path in ordinary:
        path.write_bytes(b"keep")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in ordinary) and not any(p.exists() for p in stale)


def test_a_full_disk_is_one_error_naming_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    import errno

    from midms_cli import atomic
    from midms_cli.errors import MidmsError

    def full(event, path):
        if event == "written":
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "_fault_hook", full)
    with pytest.raises(MidmsError, match=r"cannot write .*out.txt: the disk is full"):
        write_text(tmp_path / "out.txt", "x")
    assert list(tmp_path.iterdir()) == []


def test_output_paths_are_checked_before_any_work(tmp_path, capsys):
    from midms_cli.atomic import check_output_dir, check_output_file
    from midms_cli.errors import MidmsError

    (tmp_path / "file").write_text("x")
    with pytest.raises(MidmsError, match="is a file"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(MidmsError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "file" / "run")
    with pytest.raises(MidmsError, match="is a directory"):
        check_output_file(tmp_path, "-o")
    assert check_output_file(tmp_path / "new.png") is False and capsys.readouterr().err == ""
    assert check_output_file(tmp_path / "file") is True
    assert "exists and will be replaced" in capsys.readouterr().err
    check_output_dir(tmp_path / "a" / "b")  # missing folders are fine: they are created
    assert not (tmp_path / "a").exists()


def test_undo_on_failure_removes_what_the_block_added_unless_it_holds_a_resumable_file(tmp_path):
    from midms_cli.atomic import undo_on_failure

    def keep(path):
        return path.name.startswith("ckpt-")

    out = tmp_path / "new" / "run"
    with pytest.raises(RuntimeError):
        with undo_on_failure(out, keep):
            out.mkdir(parents=True)
            (out / "config.json").write_text("{}")
            raise RuntimeError("bad input")
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "mine.txt").write_text("user file")
    with pytest.raises(RuntimeError):
        with undo_on_failure(existing, keep):
            (existing / "config.json").write_text("{}")
            raise RuntimeError("bad input")
    assert sorted(p.name for p in existing.iterdir()) == ["mine.txt"]
    with pytest.raises(RuntimeError):
        with undo_on_failure(existing, keep):
            (existing / "config.json").write_text("{}")
            (existing / "ckpt-00000001.safetensors").write_text("resumable")
            raise RuntimeError("late failure")
    assert (existing / "config.json").exists()  # kept: the run can resume


def test_replacement_notice_comes_from_the_first_process_only(tmp_path, capsys, monkeypatch):
    from midms_cli.atomic import check_output_file, check_output_files

    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("RANK", "1")
    assert check_output_file(tmp_path / "file") is True
    assert check_output_files([tmp_path / "file"]) == 1
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert check_output_files([tmp_path / "file"]) == 1
    assert capsys.readouterr().err == f"note: {tmp_path / 'file'} exists and will be replaced\n"
