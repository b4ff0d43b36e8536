"""`midms weights export`: one inference file from a model or run, with the sampler it ships."""

from __future__ import annotations

import json

import pytest
import torch
from test_translate import micro_config  # the same micro model as the translate tests
from typer.testing import CliRunner

from midms_cli.checkpoint import load_checkpoint, read_metadata
from midms_cli.cli.app import app, main
from midms_cli.models.midm import MIDM
from midms_cli.pipelines.translate import load_midm, save_midm
from midms_cli.weights import sha256_file


@pytest.fixture
def source(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "run" / "model.safetensors"
    path.parent.mkdir()
    save_midm(path, MIDM(micro_config()), {"trained_by": "a test"})
    return path


def _export(*args):
    return CliRunner().invoke(app, ["--json", "weights", "export", *map(str, args)])


def test_export_stores_half_weights_the_sampler_and_the_source(source, tmp_path):
    out = tmp_path / "out.safetensors"
    result = _export(source.parent, "-o", out, "--half", "--sampling", "tau=0.031",
                     "--sampling", "rewarp_positions=[]", "--sampling", "refine=none")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["weights_dtype"] == "float16" and summary["sampling"]["tau"] == 0.031
    metadata = read_metadata(out)
    assert metadata["source"]["sha256"] == sha256_file(source) and metadata["trained_by"] == "a test"
    assert metadata["source"]["file"] == "model.safetensors"
    assert metadata["config"]["sampling"]["rewarp_positions"] == []
    assert metadata["config"]["sampling"]["refine"] == "none"
    stored, original = load_checkpoint(out), load_checkpoint(source)
    assert set(stored.tensors) == set(original.tensors)
    for name, tensor in original.tensors.items():
        if tensor.is_floating_point():
            assert stored.tensors[name].dtype == torch.float16
            assert torch.equal(stored.tensors[name], tensor.half()), name
    model = load_midm(out)  # the file alone rebuilds the model, with the exported sampler
    assert model.config.sampling.tau == 0.031 and model.config.sampling.rewarp_positions == ()


def test_export_without_options_is_the_same_model(source, tmp_path):
    out = tmp_path / "same.safetensors"
    assert _export(source, "-o", out, "--trained-by", "by hand").exit_code == 0
    stored, original = load_checkpoint(out), load_checkpoint(source)
    assert all(torch.equal(stored.tensors[name], t) for name, t in original.tensors.items())
    assert read_metadata(out)["trained_by"] == "by hand"
    assert read_metadata(out)["config"] == read_metadata(source)["config"]


@pytest.mark.parametrize(
    "setting, message",
    [
        ("taux=1", "--sampling taux: no such sampler setting"),
        ("tau", "write KEY=VALUE"),
        ("tau=-1", "--sampling: sampling.tau"),
        ("rewarp_positions=[9]", "--sampling: sampling"),
    ],
)
def test_a_bad_sampler_setting_is_one_line_and_writes_nothing(source, tmp_path, capsys, setting, message):
    out = tmp_path / "bad.safetensors"
    with pytest.raises(SystemExit) as info:
        main(["weights", "export", str(source), "-o", str(out), "--sampling", setting])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
