"""`midms demo` (pipelines/demo.py, cli/demo.py) and the bundled model with the shipped examples."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from midms_cli.cli.app import app
from midms_cli.errors import MidmsError
from midms_cli.grids import CAPTION_HEIGHT, GAP, condition_picture, labelled_grid
from midms_cli.pipelines import demo, demo_stages

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"

# Smaller than `--quick`: the same stages and code path, a couple of steps each.
TINY = demo.DemoProfile(
    "quick",
    "test",
    train_count=16,
    eval_count=4,
    autoencoder_iters=2,
    diffusion_iters=2,
    warmup_iters=2,
    train_iters=1,
    batch_size=2,
    grid=2,
    sampler={"refine": "none", "interleaved_steps": 1, "ddim_steps": 32, "tau": 0.02},
)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """One tiny demo through the CLI (--json), then the same command again (everything skipped)."""
    out = tmp_path_factory.mktemp("demo") / "run"
    patch = pytest.MonkeyPatch()
    patch.setitem(demo.PROFILES, "quick", TINY)
    try:
        runner = CliRunner()
        args = ["--json", "--device", "cpu", "demo", "--quick", "--out", str(out), "--seed", "3"]
        first = runner.invoke(app, args)
        assert first.exit_code == 0, first.output
        second = runner.invoke(app, args)
        assert second.exit_code == 0, second.output
    finally:
        patch.undo()
    return out, _last_json(first.stdout), _last_json(second.stdout)


def _last_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def test_demo_runs_every_stage_in_order_and_records_numbers(demo_run):
    out, summary, _ = demo_run
    assert [s["stage"] for s in summary["stages"]] == list(demo.STAGES)
    assert not any(s["skipped"] for s in summary["stages"])
    by_stage = {s["stage"]: s for s in summary["stages"]}
    assert by_stage["prepare"]["numbers"] == {"train_samples": 16, "val_samples": 4}
    assert by_stage["autoencoder"]["numbers"]["steps"] == 2
    assert by_stage["train"]["numbers"]["steps"] == 1
    evaluation = by_stage["evaluate"]["numbers"]
    for row in ("model", "exemplar_copy", "initial_warp"):
        assert {f"{row}.oracle_psnr", f"{row}.swd"} <= set(evaluation)
    # summary.json holds the last run's summary (the rerun's: every stage skipped).
    stored = json.loads((out / demo.SUMMARY_FILE).read_text())["stages"]
    assert [s["numbers"] for s in stored] == [s["numbers"] for s in summary["stages"]]


def test_demo_outputs_are_valid_images_and_a_loadable_model(demo_run):
    out, summary, _ = demo_run
    with Image.open(summary["grid"]) as grid:
        grid.load()
        # One captioned row per pair: condition | exemplar | output | oracle, tiles enlarged twice.
        tile = 2 * 64 + GAP
        assert grid.mode == "RGB" and grid.size == (
            4 * tile + GAP,
            2 * CAPTION_HEIGHT + TINY.grid * tile + GAP,
        )
    outputs = sorted((out / "eval" / "images" / "output").glob("*.png"))
    assert len(outputs) == TINY.eval_count
    for path in outputs:
        with Image.open(path) as image:
            assert image.size == (64, 64)
    assert (out / "eval" / "report.html").is_file()
    from midms_cli.checkpoint import read_metadata
    from midms_cli.pipelines.translate import load_midm

    metadata = read_metadata(summary["model"], expected_kind="midms")
    assert metadata["demo_profile"] == "quick" and metadata["config"]["condition"] == "canny"
    config = load_midm(summary["model"]).config
    assert config.correspondence.cond_channels == 1
    # The profile's sampler is the exported file's default and the one its training ran with.
    sampling = config.sampling
    stored = (sampling.refine, sampling.interleaved_steps, sampling.ddim_steps, sampling.tau)
    assert stored == ("none", 1, 32, 0.02)
    for phase in ("warmup", "train"):
        trained = json.loads((out / "runs" / phase / "config.json").read_text())["sampling"]
        fields = ("refine", "interleaved_steps", "ddim_steps", "tau")
        assert tuple(trained[k] for k in fields) == stored


def test_model_config_applies_the_profile_sampler_over_the_preset():
    official = demo.model_config(demo.PROFILES["full"]).sampling
    assert official.interleaved_steps == 4 and official.rewarp_positions == (1, 2)  # spec 1.7
    config = demo.model_config(TINY)
    sampling = config.sampling
    stored = (sampling.refine, sampling.interleaved_steps, sampling.ddim_steps, sampling.tau)
    assert stored == ("none", 1, 32, 0.02)
    assert sampling.rewarp_positions == ()  # a one-step loop has no step between the first and the last
    assert sampling.confidence_masking == official.confidence_masking  # fields the profile leaves alone
    assert config.training.max_iters == TINY.warmup_iters + TINY.train_iters


def test_model_config_refuses_a_profile_sampler_a_model_file_could_not_hold():
    bad = demo.DemoProfile("bad", "test", 16, 4, 2, 2, 2, 1, sampler={"tau": 0.0})
    with pytest.raises(MidmsError, match=r"sampling\.tau"):
        demo.model_config(bad)


def test_demo_rerun_skips_finished_stages(demo_run):
    _, first, second = demo_run
    assert all(s["skipped"] for s in second["stages"])
    assert [s["numbers"] for s in second["stages"]] == [s["numbers"] for s in first["stages"]]


def test_demo_refuses_a_folder_made_with_other_settings(demo_run):
    out, _, _ = demo_run
    options = demo.DemoOptions(out=out, profile=TINY, seed=4)
    with pytest.raises(MidmsError, match="other settings"):
        demo.run_demo(options)


def test_demo_refuses_a_folder_of_an_older_plan_version(tmp_path):
    options = demo.DemoOptions(out=tmp_path, profile=TINY, seed=3)
    older = {k: v for k, v in demo.plan(options).items() if k != "version"}
    (tmp_path / demo.PLAN_FILE).write_text(json.dumps(older))
    with pytest.raises(MidmsError, match="midms version"):
        demo.check_plan(tmp_path, demo.plan(options))
    demo.check_plan(tmp_path / "new", demo.plan(options))  # a new folder records the plan
    demo.check_plan(tmp_path / "new", demo.plan(options))  # and accepts it again
    assert json.loads((tmp_path / "new" / demo.PLAN_FILE).read_text())["version"] == demo.PLAN_VERSION


def test_demo_redoes_a_stage_whose_record_is_missing(demo_run, tmp_path):
    out, _, _ = demo_run
    record = demo.read_record(out, "translate")
    assert record is not None and record.skipped
    (out / "grid.png").unlink()
    demo.stage_file(out, "translate").unlink()
    options = demo.DemoOptions(out=out, profile=TINY, seed=3, device="cpu")
    redone = demo.run_stage(options, "translate")
    assert not redone.skipped and (out / "grid.png").is_file()


def test_labelled_grid_places_tiles_under_their_captions():
    tiles = [[torch.full((3, 2, 2), v) for v in (-1.0, 0.0, 1.0)] for _ in range(2)]
    grid = labelled_grid(tiles, ("a", "b", "c"), scale=3)
    assert grid.shape == (3, CAPTION_HEIGHT + 2 * (6 + GAP) + GAP, 3 * (6 + GAP) + GAP)
    left = lambda column: GAP + column * (6 + GAP)  # noqa: E731
    for row in range(2):
        top = CAPTION_HEIGHT + GAP + row * (6 + GAP)
        values = [grid[:, top : top + 6, left(c) : left(c) + 6] for c in range(3)]
        assert [v.unique().tolist() for v in values] == [
            [-1.0],
            [pytest.approx(128 / 127.5 - 1, abs=1e-6)],
            [1.0],
        ]
    with pytest.raises(ValueError, match="one tile per caption"):
        labelled_grid([[tiles[0][0]]], ("a", "b"))


def test_condition_picture_draws_edges_black_on_white():
    edges = torch.tensor([[[0.0, 1.0]]])
    picture = condition_picture(edges)
    assert picture.shape == (3, 1, 2)
    assert picture[:, 0, 0].tolist() == [1.0, 1.0, 1.0] and picture[:, 0, 1].tolist() == [-1.0, -1.0, -1.0]


def test_headline_numbers_flattens_every_method():
    results = {
        "methods": {
            "model": {"oracle_output_psnr": 20.123456, "swd_oracle": 5.0, "oracle_warp_psnr": 1.0},
            "exemplar_copy": {"oracle_output_psnr": 18.0},
        }
    }
    assert demo_stages.headline_numbers(results) == {
        "model.oracle_psnr": 20.1235,
        "model.swd_oracle": 5.0,
        "exemplar_copy.oracle_psnr": 18.0,
    }


def test_demo_rejects_quick_together_with_another_profile(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "midms_cli",
            "demo",
            "--quick",
            "--profile",
            "bundle",
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--quick or --profile" in result.stderr
    assert not (tmp_path / "x").exists()


def _example_pair() -> tuple[Path, Path]:
    conditions = sorted(EXAMPLES.glob("*_cond.png"))
    exemplars = sorted(EXAMPLES.glob("*_ref.png"))
    assert conditions and exemplars, "examples/ holds *_cond.png and *_ref.png pairs"
    return conditions[0], exemplars[-1]


def test_translate_example_with_the_bundled_model_and_no_other_argument(tmp_path):
    from midms_cli.pipelines.translate import BUNDLED_MODEL

    assert BUNDLED_MODEL.is_file() and BUNDLED_MODEL.stat().st_size <= 20 * 2**20
    condition, exemplar = _example_pair()
    out = tmp_path / "tmp" / "out.png"
    result = subprocess.run(
        [sys.executable, "-m", "midms_cli", "translate", str(condition), str(exemplar), "-o", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    with Image.open(out) as image:
        image.load()
        assert image.size == (64, 64) and image.mode == "RGB"


def test_demo_shows_the_bundled_model_on_new_pairs_with_every_method(tmp_path):
    out = tmp_path / "show"
    command = [sys.executable, "-m", "midms_cli", "--json", "demo", "--out", str(out), "--pairs", "4"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    summary = _last_json(result.stdout)
    assert list(summary["methods"]) == ["model", "no_mask", "no_rewarp", "initial_warp", "exemplar_copy",
                                        "source_photo", "ceiling"]  # fmt: skip
    for row in summary["methods"].values():
        assert {"oracle_output_psnr", "part_colour_error", "swd_oracle"} <= set(row)
    # Pairs that need translation: the condition's own photo is far from the answer, the ceiling close.
    methods = summary["methods"]
    assert methods["ceiling"]["oracle_output_psnr"] > methods["source_photo"]["oracle_output_psnr"] + 5
    with Image.open(summary["grid"]) as grid:
        assert grid.mode == "RGB" and grid.size[0] == 4 * (2 * 64 + GAP) + GAP
    assert (out / "eval" / "report.html").is_file() and (out / "showcase.json").is_file()
    assert "training" not in result.stderr.lower()
    # The bundled sampler has no re-warps: both ablations are its numbers, and the table says so.
    assert summary["same_as_model"] == ["no_mask", "no_rewarp"]
    assert methods["no_mask"] == methods["model"] == methods["no_rewarp"]
    command = [sys.executable, "-m", "midms_cli", "demo", "--out", str(tmp_path / "t"), "--pairs", "2"]
    table = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "COLUMNS": "160"})
    assert table.returncode == 0, table.stderr
    assert "no_rewarp (= model)" in table.stdout


def test_quick_training_demo_says_its_outputs_are_noise(demo_run):
    out, _, _ = demo_run
    assert "noise by design" in (out / "eval" / "report.html").read_text()
