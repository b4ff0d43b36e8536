"""`midms info` names the bundled model; files record the command, not the machine's paths."""

from __future__ import annotations

import json

from test_cli import _run_main

from midms_cli.checkpoint import read_metadata, recorded_command, save_checkpoint
from midms_cli.cli.state import STATE
from midms_cli.pipelines.translate import BUNDLED_MODEL


def test_info_names_the_bundled_model(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MIDMS_HOME", str(tmp_path / "home"))
    code, out, err = _run_main(["--json", "info"], capsys)
    assert code == 0, err
    bundled = json.loads(out)["bundled_model"]
    metadata = read_metadata(BUNDLED_MODEL)["config"]
    assert bundled == {"path": str(BUNDLED_MODEL), "condition": metadata["condition"],
                       "image_size": metadata["image_size"]}
    STATE.json = False
    code, out, err = _run_main(["info"], capsys)
    words = " ".join(out.split())
    assert "bundled_model" in words
    assert "(used when --model is not given)" in words


def test_the_recorded_command_has_no_machine_path():
    assert recorded_command(["/root/.pyenv/versions/3.11.7/bin/midms", "demo", "--out", "x"]) == [
        "midms", "demo", "--out", "x"]
    assert recorded_command(["/usr/lib/python3/site-packages/midms_cli/__main__.py", "train"]) == [
        "midms", "train"]
    assert recorded_command(["/home/me/scripts/make_model.py", "--fast"]) == ["make_model.py", "--fast"]


def test_checkpoints_record_the_recorded_command(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr("sys.argv", ["/opt/venv/bin/midms", "train", "--out", "runs/a"])
    save_checkpoint(tmp_path / "c.safetensors", {"w": torch.zeros(1)}, {}, "test")
    assert read_metadata(tmp_path / "c.safetensors")["command"] == ["midms", "train", "--out", "runs/a"]


def test_the_license_file_matches_the_package_metadata():
    from pathlib import Path

    import tomllib

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "MIT"}
    assert (root / "LICENSE").read_text().startswith("MIT License\n")
