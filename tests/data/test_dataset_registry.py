"""Plugin discovery through entry points: a separately installed distribution, a broken one, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from midms_cli.cli.app import app, main
from midms_cli.data.shards import iterate_samples, read_index
from midms_cli.errors import MidmsError

FAKE_SOURCE = Path(__file__).with_name("fake_dataset.py")


def make_distribution(root: Path) -> Path:
    """A throwaway installed distribution `thirdparty-ds`: a module + *.dist-info with entry points."""
    site = root / "site"
    site.mkdir()
    (site / "thirdparty_ds.py").write_text(FAKE_SOURCE.read_text())
    (site / "thirdparty_broken.py").write_text("import a_module_that_does_not_exist\n")
    (site / "thirdparty_wrong.py").write_text("PLUGIN = 42\n")
    info = site / "thirdparty_ds-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-ds\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[midms.datasets]\n"
        "thirdparty = thirdparty_ds:PLUGIN\n"
        "broken-import = thirdparty_broken:PLUGIN\n"
        "wrong-type = thirdparty_wrong:PLUGIN\n"
    )
    return site


def midms(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "midms_cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip


def test_installed_plugin_is_listed_and_broken_ones_reported_by_name(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(make_distribution(tmp_path)))  # importlib.metadata scans sys.path
    runner = CliRunner()
    listing = runner.invoke(app, ["--json", "datasets"])
    assert listing.exit_code == 0, listing.output
    result = json.loads(listing.stdout)
    names = {row["name"]: row for row in result["plugins"]}
    assert names["thirdparty"]["condition"] == "fake" and names["thirdparty"]["channels"] == 2
    assert "synthfaces" in names and "celebahq" in names  # the built-in ones still work
    assert "No module named 'a_module_that_does_not_exist'" in result["broken"]["broken-import"]
    assert "not a dataset plugin" in result["broken"]["wrong-type"]

    broken = runner.invoke(app, ["prepare", "broken-import", "--out", str(tmp_path / "x")])
    assert broken.exit_code == 1 and isinstance(broken.exception, MidmsError)  # main() prints it, exit 2
    assert "'broken-import' is installed but broken" in str(broken.exception)
    assert "a_module_that_does_not_exist" in str(broken.exception)
    code, err = run_main(["prepare", "broken-import", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and err.strip().count("\n") == 0 and "broken-import" in err


def test_separately_installed_plugin_runs_under_midms_prepare_in_a_subprocess(tmp_path):
    site = make_distribution(tmp_path)
    out = tmp_path / "shards"
    prepared = midms(site, "prepare", "thirdparty", "--out", str(out), "--size", "8", "--split", "val",
                     "--count", "3", "--channels", "1")  # fmt: skip
    assert prepared.returncode == 0, prepared.stderr
    index = read_index(out, "val")
    assert index["plugin"] == "thirdparty" and index["count"] == 3 and index["condition"]["channels"] == 1
    assert "--count 3" in index["command"] and "--channels 1" in index["command"]
    assert [s["cond"].shape[0] for s in iterate_samples(out, "val")] == [1, 1, 1]


def test_prepare_help_lists_installed_plugins_and_plugin_options():
    runner = CliRunner()
    listing = runner.invoke(app, ["prepare", "--help"])
    assert listing.exit_code == 0
    for name in ("synthfaces", "celebahq", "deepfashion", "lsun-churches", "folder"):
        assert name in listing.output
    helped = runner.invoke(app, ["prepare", "synthfaces", "--help"], terminal_width=200)
    assert helped.exit_code == 0
    assert "--variant" in helped.output and "--shard-size" in helped.output and "--out" in helped.output


def run_main(args: list[str], capsys) -> tuple[int, str]:
    """The console entry point in-process: (exit code, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


def test_unknown_dataset_is_one_line_exit_2(tmp_path, capsys):
    code, err = run_main(["prepare", "imagenet", "--out", str(tmp_path)], capsys)
    assert code == 2
    assert err.strip().count("\n") == 0
    assert "unknown dataset 'imagenet'" in err and "synthfaces" in err


def test_prepare_synthfaces_without_source(tmp_path):
    runner = CliRunner()
    args = ["prepare", "synthfaces", "--out", str(tmp_path), "--size", "32", "--limit", "2", "--split", "val"]
    result = runner.invoke(app, [*args, "--variant", "canny"])
    assert result.exit_code == 0, result.output
    index = read_index(tmp_path, "val")
    assert index["plugin"] == "synthfaces" and index["count"] == 2
    assert index["condition"] == {"kind": "canny", "channels": 1, "encoding": "npy.gz uint8 / 255"}
    samples = list(iterate_samples(tmp_path, "val"))
    assert samples[0]["oracle"].shape == (3, 32, 32)
