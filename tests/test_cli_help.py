"""Help that fits an 80-column terminal, -h, --version, and a `midms --help` that does not load torch."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import typer
from test_cli import _run_main

import midms_cli
from midms_cli.cli.lazy import COMMANDS, load_command


def _subcommands(help_text: str) -> list[str]:
    """The names listed under "Commands:" in click's help layout."""
    if "\nCommands:\n" not in help_text:
        return []
    section = help_text.split("\nCommands:\n", 1)[1]
    return [m.group(1) for m in re.finditer(r"^  (\S+)", section, flags=re.MULTILINE)]


def _command(path: list[str]):
    command = load_command(path[0])
    for name in path[1:]:
        command = command.get_command(typer.Context(command), name)
    return command


def _all_paths(capsys, monkeypatch) -> dict[tuple[str, ...], str]:
    monkeypatch.setenv("COLUMNS", "80")
    found, todo = {}, [[name] for name in COMMANDS]
    while todo:
        path = todo.pop()
        code, out, err = _run_main([*path, "--help"], capsys)
        assert code == 0, (path, err)
        found[tuple(path)] = out
        todo += [[*path, sub] for sub in _subcommands(out)]
    return found


def test_every_help_fits_80_columns_with_whole_option_names(capsys, monkeypatch):
    helps = _all_paths(capsys, monkeypatch)
    assert ("weights", "import-ldm") in helps and ("prepare", "synthfaces") in helps
    for path, text in helps.items():
        assert max(len(line) for line in text.splitlines()) <= 80, path
        assert "…" not in text and "<bool>" not in text, path
        for param in _command(list(path)).params:
            for name in [*param.opts, *param.secondary_opts]:
                if name.startswith("-") and not getattr(param, "hidden", False):
                    whole = rf"(^|[\s,/]){re.escape(name)}($|[\s,])"
                    assert re.search(whole, text, re.MULTILINE), (path, name)


def test_flags_show_no_value_placeholder(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = _run_main(["translate", "--help"], capsys)
    assert code == 0
    assert re.search(r"^  --extract\s{2,}\S", out, re.MULTILINE)  # name, then straight the help text
    assert re.search(r"^  --size <int>", out, re.MULTILINE)


def test_short_help_option_and_version(capsys):
    code, short, _ = _run_main(["eval", "-h"], capsys)
    code_long, long, _ = _run_main(["eval", "--help"], capsys)
    assert code == code_long == 0 and short == long and "Usage: midms eval" in short
    code, out, _ = _run_main(["--version"], capsys)
    assert code == 0 and out == f"midms {midms_cli.__version__}\n"


@pytest.mark.parametrize("name", list(COMMANDS))
def test_the_command_table_matches_each_commands_own_help(name):
    """`midms --help` lists commands from a table (so it imports none of them): it must not drift."""
    own = " ".join(load_command(name).help.split("\n\n")[0].split())
    assert COMMANDS[name][1] == own


@pytest.mark.parametrize("argv", [["--help"], ["translate", "--help"]])
def test_help_does_not_import_torch(argv):
    script = (
        "import sys\nfrom midms_cli.cli.app import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "sys.stderr.write(str('torch' in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stderr == "False" and "Usage: midms" in result.stdout
