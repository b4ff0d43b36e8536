"""`evaluate_model` end to end on tiny synthfaces shards with a tiny random model."""

from __future__ import annotations

import dataclasses
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from midms_cli.config import CorrespondenceConfig
from midms_cli.data.registry import get_plugin
from midms_cli.errors import MidmsError
from midms_cli.models.lpips_net import LPIPS
from midms_cli.models.midm import MIDM
from midms_cli.pipelines.evaluate import EvalOptions, evaluate_model, plan_pairs, split_keys
from midms_cli.pipelines.prepare import PrepareConfig, prepare
from midms_cli.pipelines.translate import load_midm, save_midm
from midms_cli.presets import preset


class _TinyInception(torch.nn.Module):
    """Stands in for the FID Inception: 8-d pooled features of images in [0, 1]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3)

    def forward(self, images):
        return F.relu(self.conv(images)).mean(dim=(2, 3))


class _TinyVGG(torch.nn.Module):
    def forward(self, image, layers):
        x = (image + 1) / 2
        names = ("r12", "r22", "r32", "r42", "r52")
        return {name: F.avg_pool2d(x, 2**i) for i, name in enumerate(names) if name in layers}


def _networks():
    torch.manual_seed(1)
    lpips = LPIPS("alex").eval()
    return {"inception": _TinyInception().eval(), "vgg": _TinyVGG(), "lpips": lpips}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    config = PrepareConfig(
        dataset="synthfaces", out=root / "shards", size=64, splits=("val",), limit=3, shard_size=2
    )
    prepare(config, get_plugin("synthfaces"))
    torch.manual_seed(0)
    # The tiny preset made narrower still, and no refinement (only the 4 interleaved UNet calls).
    model_config = preset("tiny")
    model_config.sampling.refine = "none"
    model_config.autoencoder.num_res_blocks, model_config.autoencoder.ch_mult = 1, (1, 1, 1)
    model_config.unet.channel_mult, model_config.unet.attention_resolutions = (1, 1), ()
    model_config.correspondence = CorrespondenceConfig(
        channels=16, stem_channels=(8, 16, 16), trunk_blocks=1, spade_hidden=16
    )
    save_midm(root / "model.safetensors", MIDM(model_config))
    return root


def _run(root: Path, out: Path, **kwargs):
    return evaluate_model(
        root / "model.safetensors",
        root / "shards",
        "val",
        out,
        limit=2,
        seed=3,
        diversity=1,
        batch_size=3,
        networks=_networks(),
        report=lambda line: None,
        **kwargs,
    )


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources, self.open = [], 0

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def test_end_to_end_files_numbers_and_reproducibility(setup, tmp_path):
    first = _run(setup, tmp_path / "a", baselines=True)
    results = first["results"]
    methods = results["methods"]
    assert list(methods) == ["model", "no_mask", "no_rewarp", "initial_warp", "exemplar_copy", "source_photo",
                             "ceiling"]  # fmt: skip
    model, copy = methods["model"], methods["exemplar_copy"]
    for name in (
        "fid",
        "fid_exemplars",
        "kid",
        "swd",
        "swd_64",
        "swd_16",
        "swd_oracle",
        "swd_oracle_32",
        "lpips_diversity",
        "style_colour",
        "semantic_consistency",
        "oracle_output_psnr",
        "oracle_output_psnr_skin",
        "part_colour_error",
        "part_colour_error_background",
    ):
        assert name in model, name
    assert copy["fid_exemplars"] == pytest.approx(0.0, abs=1e-6)  # the copy *is* the exemplar set
    assert 0.5 < copy["style_colour"] <= 1.0  # same colours, but regions of different geometries
    assert results["seeds"] == [3] and results["sd"] == {} and len(results["per_seed"]) == 1
    out = tmp_path / "a"
    protocol = json.loads((out / "protocol.json").read_text())
    assert protocol["protocol_version"] == 2 and protocol["pairs"] == 4 and protocol["primary_pairs"] == 2
    assert protocol["size"] == 64 and protocol["seeds"]["generation"] == [3]
    assert protocol["ablations"]["no_rewarp"] == {"confidence_masking": False, "rewarp_positions": []}
    assert protocol["methods"]["no_mask"] == "- confidence mask"  # the preset's loop re-warps
    assert (out / "pairs.txt").read_text().splitlines() == [
        "val0000000 val0000000",
        "val0000000 val0000001",
        "val0000001 val0000001",
        "val0000001 val0000002",
    ]
    assert len(list((out / "images" / "output").glob("*.png"))) == 4
    parser = _Images()
    parser.feed((out / "report.html").read_text())
    assert parser.sources and all((out / src).is_file() for src in parser.sources)
    assert not any(src.startswith("/") for src in parser.sources)

    second = _run(setup, tmp_path / "b", baselines=True)
    assert second["results"] == results
    assert (tmp_path / "b" / "protocol.json").read_text() == (out / "protocol.json").read_text()
    assert (tmp_path / "b" / "results.json").read_text() == (out / "results.json").read_text()


def _pairs(root: Path, count: int) -> list[dict]:
    from midms_cli.data.shards import iterate_samples

    return [sample for sample, _ in zip(iterate_samples(root / "shards", "val"), range(count), strict=False)]


def test_baseline_rows_score_the_exemplar_the_source_photo_and_the_oracle_itself(setup, tmp_path):
    from midms_cli.metrics.oracle import psnr

    methods = _run(setup, tmp_path / "a", baselines=True, metrics=["oracle"])["results"]["methods"]
    samples = _pairs(setup, 2)  # the two primary pairs of limit=2

    def quantised(images):
        return torch.round((images + 1) * 127.5) / 127.5 - 1

    oracle = torch.stack([s["oracle"] for s in samples])
    for row, images in (
        ("exemplar_copy", [s["ref"] for s in samples]),
        ("source_photo", [s["image"] for s in samples]),
    ):
        expected = psnr(quantised(torch.stack(images)), oracle).mean().item()
        assert methods[row]["oracle_output_psnr"] == pytest.approx(expected, abs=1e-9)
    # The val exemplars have their own colours: neither the copy nor the photo is the answer.
    assert (
        methods["exemplar_copy"]["oracle_output_psnr"] < 40
        and methods["source_photo"]["oracle_output_psnr"] < 40
    )
    assert methods["source_photo"]["part_colour_error"] > 0


def test_seeds_give_the_mean_and_sd_of_the_per_seed_numbers(setup, tmp_path):
    results = _run(setup, tmp_path / "s", baselines=True, metrics=["oracle"], seeds=2)["results"]
    assert results["seeds"] == [3, 4] and [run["seed"] for run in results["per_seed"]] == [3, 4]
    values = [run["methods"]["model"]["oracle_output_psnr"] for run in results["per_seed"]]
    assert values[0] != values[1]  # the noise differs between seeds
    mean = sum(values) / 2
    assert results["methods"]["model"]["oracle_output_psnr"] == pytest.approx(mean)
    assert results["sd"]["model"]["oracle_output_psnr"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    # Baselines without noise do not move.
    assert results["sd"]["exemplar_copy"]["oracle_output_psnr"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(MidmsError, match="--seeds"):
        _run(setup, tmp_path / "bad", seeds=0)


def test_pair_list_with_unknown_key_fails_before_any_output(setup, tmp_path):
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("val0000000 val0000009\n")
    with pytest.raises(MidmsError, match="names sample 'val0000009'"):
        _run(setup, tmp_path / "out", pairs_path=pairs)
    assert not (tmp_path / "out").exists()


def test_pair_list_limit_keeps_first_conditions(setup):
    keys = split_keys(setup / "shards", "val")
    assert keys == ["val0000000", "val0000001", "val0000002"]
    pairs = plan_pairs(keys, EvalOptions(limit=1, diversity=2))
    assert [(p.condition, p.exemplar) for p in pairs] == [
        ("val0000000", "val0000000"),
        ("val0000000", "val0000001"),
        ("val0000000", "val0000002"),
    ]


def test_cli_model_mode_prints_table_and_writes_files(setup, tmp_path, monkeypatch, capsys):
    from midms_cli.cli.app import main

    monkeypatch.setenv("MIDMS_HOME", str(tmp_path / "home"))
    argv = [
        "--json",
        "eval",
        "--model",
        str(setup / "model.safetensors"),
        "--data",
        str(setup / "shards"),
        "--limit",
        "1",
        "--diversity",
        "0",
        "--metrics",
        "swd,oracle",
        "--out",
        str(tmp_path / "cli"),
    ]
    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    assert (info.value.code or 0) == 0, err
    result = json.loads(out)
    assert set(result["results"]["methods"]["model"]) >= {"swd", "oracle_output_psnr", "part_colour_error"}
    assert result["protocol"]["metrics"] == ["swd", "oracle"] and result["protocol"]["pairs"] == 1
    for name in ("protocol.json", "results.json", "report.html", "pairs.txt"):
        assert (tmp_path / "cli" / name).is_file()
    with pytest.raises(SystemExit) as info:
        main(
            [
                "eval",
                "--model",
                str(setup / "model.safetensors"),
                "--data",
                str(setup / "shards"),
                "--metrics",
                "lpips",
                "--out",
                str(tmp_path / "none"),
            ]
        )
    _, err = capsys.readouterr()
    assert (
        info.value.code == 2
        and "midms weights add alexnet FILE" in err
        and len(err.strip().splitlines()) == 1
    )
    assert not (tmp_path / "none").exists()


def test_reference_features_are_cached_per_data_pairs_and_network(setup, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from midms_cli.models.inception import FIDInceptionV3

    home = tmp_path / "home"
    monkeypatch.setenv("MIDMS_HOME", str(home))
    torch.manual_seed(0)
    state = {
        k: (v.abs() + 0.5 if k.endswith("running_var") else v)
        for k, v in FIDInceptionV3().state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    (home / "weights").mkdir(parents=True)
    save_file(
        state, str(home / "weights" / "inception-fid.safetensors"), metadata={"source_sha256": "cd" * 32}
    )

    def run(out):
        return evaluate_model(
            setup / "model.safetensors",
            setup / "shards",
            "val",
            out,
            ["fid"],
            limit=2,
            seed=0,
            diversity=0,
            report=lambda line: None,
        )

    first = run(tmp_path / "a")
    assert sorted(first["results"]["methods"]["model"]) == ["fid", "fid_exemplars"]
    assert first["protocol"]["weights"] == {"inception-fid": "cd" * 32}
    cached = sorted((home / "fid-stats").glob("*.safetensors"))
    assert len(cached) == 2  # sources and exemplars
    stamps = [path.stat().st_mtime_ns for path in cached]
    assert run(tmp_path / "b")["results"] == first["results"]
    assert [path.stat().st_mtime_ns for path in cached] == stamps  # read, not rewritten


def test_ablations_that_take_nothing_out_of_the_sampler_are_labelled_and_equal_the_model(setup, tmp_path):
    """A sampler without re-warps: removing the mask or the re-warps leaves the same loop, so both rows
    are the model's numbers and their labels say so; with re-warps (the preset's) they are not."""
    from midms_cli.pipelines.eval_methods import SAME_AS_MODEL, as_run

    sampling = preset("tiny").sampling
    assert as_run(dataclasses.replace(sampling, rewarp_positions=())) == as_run(
        dataclasses.replace(sampling, rewarp_positions=(), confidence_masking=False)
    )
    assert as_run(sampling) != as_run(dataclasses.replace(sampling, confidence_masking=False))
    # Positions outside the loop (the last step never re-warps) count as none.
    assert as_run(dataclasses.replace(sampling, interleaved_steps=2)) == as_run(
        dataclasses.replace(sampling, interleaved_steps=2, rewarp_positions=(), confidence_masking=False)
    )

    ours = tmp_path / "plain"
    ours.mkdir()
    (ours / "shards").symlink_to(setup / "shards")
    model = load_midm(setup / "model.safetensors")
    model.config.sampling.rewarp_positions = ()
    save_midm(ours / "model.safetensors", model)
    evaluation = _run(ours, tmp_path / "out", baselines=True, metrics=["oracle"])["results"]
    results = evaluation["methods"]
    assert results["no_mask"] == results["model"] == results["no_rewarp"]
    assert evaluation["same_as_model"] == ["no_mask", "no_rewarp"]
    labels = json.loads((tmp_path / "out" / "protocol.json").read_text())["methods"]
    assert labels["no_mask"].endswith(SAME_AS_MODEL) and labels["no_rewarp"].endswith(SAME_AS_MODEL)
    assert not labels["model"].endswith(SAME_AS_MODEL)
