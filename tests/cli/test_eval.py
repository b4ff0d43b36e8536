"""`midms eval --real/--fake`: folder-vs-folder metrics, weight checks and one-line user errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from midms_cli.cli.app import main
from midms_cli.images import save_png
from midms_cli.models.inception import FIDInceptionV3


def _run(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    return (info.value.code or 0), out, err


def _write_folders(tmp_path, count):
    generator = torch.Generator().manual_seed(0)
    real, fake = tmp_path / "real", tmp_path / "fake"
    for i in range(count):
        base = torch.rand(3, 32, 32, generator=generator) * 2 - 1
        save_png(base, real / f"r{i}.png")
        save_png((base * 0.5).clamp(-1, 1), fake / f"f{i}.png")
    (real / "notes.txt").write_text("not an image")
    return tmp_path, real, fake


@pytest.fixture
def folders(tmp_path, monkeypatch):
    monkeypatch.setenv("MIDMS_HOME", str(tmp_path / "home"))
    return _write_folders(tmp_path, 4)


def _store_random_inception(home):
    """Stand in for `midms weights add inception-fid`: the stored safetensors file, random values."""
    torch.manual_seed(0)
    state = {
        k: (v.abs() + 0.5 if k.endswith("running_var") else v)
        for k, v in FIDInceptionV3().state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    (home / "weights").mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(home / "weights" / "inception-fid.safetensors"),
        metadata={"name": "inception-fid", "source_sha256": "ab" * 32, "format_version": "1"},
    )


def test_folders_without_weights_run_swd_and_skip_the_rest_with_one_line_each(folders, capsys):
    tmp_path, real, fake = folders
    code, out, err = _run(
        ["--json", "eval", "--real", str(real), "--fake", str(fake), "--out", str(tmp_path / "out")], capsys
    )
    assert code == 0, err
    result = json.loads(out)
    assert set(result["results"]) == {"swd", "swd_32", "swd_16"} and result["results"]["swd"] > 0
    skipped = [line for line in err.splitlines() if line.startswith("skipping")]
    assert len(skipped) == 2 and all("midms weights add inception-fid FILE" in line for line in skipped)
    protocol = json.loads((tmp_path / "out" / "protocol.json").read_text())
    assert protocol["protocol_version"] == 2 and protocol["real_count"] == 4 and protocol["size"] == 32
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == result["results"]


def test_explicit_metric_without_weights_is_one_line_error_before_work(folders, capsys):
    tmp_path, real, fake = folders
    code, out, err = _run(
        [
            "eval",
            "--real",
            str(real),
            "--fake",
            str(fake),
            "--metrics",
            "swd,fid",
            "--out",
            str(tmp_path / "out"),
        ],
        capsys,
    )
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "midms weights add inception-fid FILE" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--metrics", "bogus"], "unknown metric 'bogus'"),
        (["--metrics", "lpips"], "needs a model and a dataset"),
        (["--real-only"], "folder mode needs both"),
    ],
)
def test_bad_requests_are_one_line_errors(folders, capsys, argv, message):
    tmp_path, real, fake = folders
    args = (
        ["eval", "--real", str(real)]
        if argv == ["--real-only"]
        else ["eval", "--real", str(real), "--fake", str(fake), *argv]
    )
    code, _, err = _run(args, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_folders_with_inception_weights_give_fid_kid_and_reuse_the_cache(tmp_path, monkeypatch, capsys):
    # Two images per folder: the full-size Inception is the slowest thing here.
    monkeypatch.setenv("MIDMS_HOME", str(tmp_path / "home"))
    _, real, fake = _write_folders(tmp_path, 2)
    _store_random_inception(tmp_path / "home")
    argv = ["--json", "eval", "--real", str(real), "--fake", str(fake), "--metrics", "fid,kid", "--seed", "1"]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    first = json.loads(out)
    assert first["results"]["fid"] > 0 and "kid" in first["results"] and "swd" not in first["results"]
    assert first["protocol"]["weights"] == {"inception-fid": "ab" * 32}
    assert len(list((tmp_path / "home" / "fid-stats").glob("*.safetensors"))) == 1
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    assert json.loads(out)["results"] == first["results"]  # computed again from the cached real features


def test_the_terminal_table_marks_ablations_that_equal_the_model():
    from rich.console import Console

    from midms_cli.cli.eval import _table

    results = {"methods": {"model": {"oracle_output_psnr": 20.0}, "no_rewarp": {"oracle_output_psnr": 20.0},
                           "initial_warp": {"oracle_output_psnr": 19.5}},
               "sd": {"model": {"oracle_output_psnr": 0.1}}, "same_as_model": ["no_rewarp"]}  # fmt: skip
    console = Console(width=160, record=True)
    console.print(_table(results))
    text = console.export_text()
    assert "no_rewarp (= model)" in text and "20.0000 ± 0.100" in text
    assert "initial_warp (=" not in text and "│ model (=" not in text and "(= model): an ablation" in text
