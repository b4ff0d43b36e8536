"""The CLI surface: `midms info --json`, one-line user errors with exit code 2, --debug tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import midms_cli
from midms_cli.cli.app import hoist_global_options, main
from midms_cli.errors import MidmsError

INFO_FIELDS = {
    "package", "version", "torch", "device", "cpu_threads", "cache_dir", "dataset_plugins", "weights",
}


def _run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    code = info.value.code
    return (0 if code is None else code), out, err


@pytest.mark.parametrize("argv", [["info", "--json"], ["--json", "info"]])
def test_info_json_has_the_documented_fields(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MIDMS_HOME", str(tmp_path / "home"))
    code, out, err = _run_main(argv, capsys)
    assert code == 0, err
    result = json.loads(out)  # exactly one JSON object on stdout
    assert INFO_FIELDS <= set(result)
    assert result["package"] == "midms" and result["version"] == midms_cli.__version__
    assert result["torch"] == torch.__version__
    assert result["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert result["cpu_threads"] == torch.get_num_threads()
    assert result["cache_dir"] == str(tmp_path / "home")
    assert isinstance(result["dataset_plugins"], list) and isinstance(result["weights"], list)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_user_error_is_one_line_on_stderr_and_exit_code_2():
    """A real process: nothing but the one error line may reach stderr (no warnings, no traceback)."""
    env = {**os.environ, "COLUMNS": "40"}  # a narrow terminal must not wrap the line
    result = subprocess.run([sys.executable, "-m", "midms_cli", "info", "--device", "cuda"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0] == "error: device 'cuda' requested but CUDA is not available here; use --device cpu"
    assert result.stdout == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_debug_shows_the_traceback(capsys):
    code, out, err = _run_main(["--debug", "info", "--device", "cuda"], capsys)
    assert code == 2
    assert "Traceback (most recent call last)" in err and "resolve_device" in err
    assert err.rstrip().splitlines()[-1].startswith("error: device 'cuda' requested")
    code, out, err = _run_main(["info", "--device", "cuda"], capsys)
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1


def test_unknown_command_is_a_usage_error_with_exit_2(capsys):
    code, out, err = _run_main(["no-such-command"], capsys)
    assert code == 2 and "No such command" in err


def test_global_options_are_moved_before_the_command():
    assert hoist_global_options(["info", "--json"]) == ["--json", "info"]
    assert hoist_global_options(["weights", "add", "-vv", "NAME", "--device", "cpu", "FILE"]) == [
        "-vv", "--device", "cpu", "weights", "add", "NAME", "FILE"]
    assert hoist_global_options(["translate", "--device=cpu", "--", "--json"]) == [
        "--device=cpu", "translate", "--", "--json"]


def test_a_multi_line_error_with_brackets_is_printed_as_one_literal_line(capsys, monkeypatch):
    """Messages may embed third-party text: newlines are joined and [brackets] are not rich markup."""
    from midms_cli.cli import info as info_module

    def broken() -> None:
        raise MidmsError("cannot load runs/[red]exp[/red]/model.safetensors:\n  key [unet.x] missing")

    monkeypatch.setattr(info_module, "resolve_device", lambda name: broken())
    code, out, err = _run_main(["info"], capsys)
    assert code == 2 and out == ""
    assert err.splitlines() == [
        "error: cannot load runs/[red]exp[/red]/model.safetensors: key [unet.x] missing"
    ]


def test_help_lists_every_command_with_a_summary(capsys):
    code, out, err = _run_main(["--help"], capsys)
    assert code == 0 and err == ""
    for command in ("info", "datasets", "weights", "pretrain", "prepare", "train", "translate", "eval"):
        line = next((line for line in out.splitlines() if line.strip("│ ").startswith(command + " ")), None)
        assert line is not None and len(line.strip("│ ")) > len(command) + 5, f"{command} has no summary"
    for option in ("--json", "--debug", "--verbose", "--device"):
        assert option in out


def test_info_and_datasets_print_text_without_json(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MIDMS_HOME", "/tmp/midms-home")  # short: the table wraps long values at 80 columns
    code, out, err = _run_main(["info"], capsys)
    assert code == 0 and err == ""
    assert "cache_dir" in out and "/tmp/midms-home" in out and not out.lstrip().startswith("{")
    code, out, err = _run_main(["datasets"], capsys)
    assert code == 0 and "synthfaces" in out and not out.lstrip().startswith("{")


@pytest.mark.parametrize("argv", [
    ["eval", "--model", "missing-model", "--data", "missing-shards"],
    ["prepare", "celebahq", "--source", "missing-folder", "--out", "shards"],
])
def test_errors_inside_a_progress_bar_are_still_one_line_and_write_nothing(
    argv, capsys, tmp_path, monkeypatch
):
    # Commands that open a progress bar before the pipeline validates its inputs must not leave the
    # bar's last state (a stray line) in front of the error.
    monkeypatch.chdir(tmp_path)
    code, _, err = _run_main(argv, capsys)
    assert code == 2
    assert len(err.strip("\n").splitlines()) == 1 and err.splitlines()[-1].startswith("error:")
    assert err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
