"""Pretraining and the shared training loop on synthfaces shards (tiny preset at 32 px, CPU).

Pins: loss goes down, exact resume after a SIGTERM mid-run, sample grids, EMA export, the NaN guard,
--dry-run, and gradient accumulation being a mean over micro-batches.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from PIL import Image

from midms_cli.checkpoint import load_checkpoint, module_state
from midms_cli.config import ModelConfig
from midms_cli.errors import MidmsError
from midms_cli.ldm_import import load_ldm
from midms_cli.pipelines import pretrain as pipeline
from midms_cli.pipelines.loop import METRICS_FILE, parameter_checksum
from midms_cli.presets import preset

SIZE = 32


@pytest.fixture(autouse=True)
def _one_thread():
    # Two cores shared by many processes: one thread avoids OpenMP oversubscription stalls.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthfaces_shards(base: Path) -> Path:
    """16 training samples in 2 shards at 32 px, made once per session (shared by the training tests)."""
    out = base / "training-shards"
    if not (out / "train" / "index.json").is_file():
        from midms_plugins.synthfaces import PLUGIN

        from midms_cli.pipelines.prepare import PrepareConfig, prepare

        prepare(PrepareConfig(dataset="synthfaces", out=out, size=SIZE, splits=("train",), limit=16,
                              shard_size=8), PLUGIN)
    return out


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    return synthfaces_shards(tmp_path_factory.getbasetemp())


def tiny32(first_stage: str = "kl") -> ModelConfig:
    """The tiny preset at 32 px (latent 8x8), so a training step takes a fraction of a second;
    `first_stage` "vq" swaps its KL-f4 first stage for a VQ-f4 one with 256 codes."""
    config = preset("tiny")
    if first_stage == "vq":
        config.autoencoder = dataclasses.replace(config.autoencoder, kind="vq", double_z=False, n_embed=256)
    config.image_size = SIZE
    config.autoencoder.resolution = SIZE
    config.unet.image_size = SIZE // config.autoencoder.downsample
    return ModelConfig.from_dict(config.to_dict())


def _config(**values) -> pipeline.PretrainConfig:
    base = dict(batch_size=2, max_iters=4, checkpoint_every=2, sample_every=2, log_every=1, lr=1e-3)
    base.update(values)
    return pipeline.PretrainConfig(**base)


def _eval_autoencoder_loss(path: Path, batch: dict) -> float:
    _, modules = load_ldm(path)
    autoencoder = modules["first_stage"].eval()
    with torch.no_grad():
        recon = autoencoder.decode(autoencoder.encode(batch["image"]))
    return float((recon - batch["image"]).abs().mean())


def _first_batch(shards: Path) -> dict:
    from midms_cli.data.shards import make_loader

    return next(iter(make_loader(shards, "train", 4, shuffle=False, resample=False)))


@pytest.mark.parametrize("first_stage, regulariser", [("kl", "kl"), ("vq", "codebook")])
def test_autoencoder_pretraining_lowers_the_loss_and_writes_model_and_samples(
    shards, tmp_path, monkeypatch, first_stage, regulariser
):
    sampled_steps = []
    write_samples = pipeline.loop.Trainer.write_samples

    def counting_write_samples(self, batch):
        sampled_steps.append(self.step)
        return write_samples(self, batch)

    monkeypatch.setattr(pipeline.loop.Trainer, "write_samples", counting_write_samples)
    out = tmp_path / "ae"
    result = pipeline.pretrain("autoencoder", shards, out, tiny32(first_stage),
                               _config(max_iters=12, sample_every=6), progress=False)
    assert result.step == 12 and not result.interrupted
    # The exported file is an `ldm` first stage that load_ldm reads; an untrained one reconstructs worse.
    batch = _first_batch(shards)
    torch.manual_seed(0)
    untrained = out.parent / "untrained.safetensors"
    task = pipeline.build_autoencoder_task(tiny32(first_stage), _config(), {})
    task.export(untrained)
    assert _eval_autoencoder_loss(out / "model.safetensors", batch) < 0.9 * _eval_autoencoder_loss(
        untrained, batch
    )
    metrics = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert {"loss", "reconstruction", regulariser, "samples_per_sec", "nonfinite_skipped"} <= set(metrics[0])
    # Sample grids: one row per sample (batch 2), columns ground truth | reconstruction.
    grids = sorted((out / "samples").glob("*.png"))
    assert [g.name for g in grids] == ["step-00000006.png", "step-00000012.png"]
    assert sampled_steps == [6, 12]  # the last step's grid is drawn once, not again at the end
    assert Image.open(grids[0]).size == (2 * SIZE, 2 * SIZE)
    config = json.loads((out / "config.json").read_text())
    assert config["pretrain"]["max_iters"] == 12 and config["autoencoder"]["resolution"] == SIZE


def test_sigterm_mid_run_then_resume_equals_an_uninterrupted_run(shards, tmp_path):
    straight = pipeline.pretrain(
        "autoencoder", shards, tmp_path / "straight", tiny32(), _config(), progress=False
    )

    def kill_at_three(step: int) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler or Ctrl-C does to the process

    out = tmp_path / "killed"
    stopped = pipeline.pretrain(
        "autoencoder", shards, out, tiny32(), _config(), progress=False, on_step=kill_at_three
    )
    assert stopped.interrupted and stopped.step == 3
    assert not (out / "model.safetensors").exists()
    assert json.loads((out / "latest").read_text())["step"] == 3
    resumed = pipeline.pretrain("autoencoder", shards, out, tiny32(), _config(), progress=False)
    assert resumed.step == 4 and not resumed.interrupted
    a = load_checkpoint(tmp_path / "straight" / "model.safetensors").tensors
    b = load_checkpoint(out / "model.safetensors").tensors
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight.last_losses == resumed.last_losses
    # The metrics log holds each step once, as if the run had never stopped.
    steps = [json.loads(line)["step"] for line in (out / METRICS_FILE).read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_diffusion_pretraining_lowers_the_loss_and_exports_the_ema(shards, tmp_path):
    ae = tmp_path / "ae"
    pipeline.pretrain(
        "autoencoder", shards, ae, tiny32(), _config(max_iters=2, sample_every=0), progress=False
    )
    out = tmp_path / "ldm"
    config = _config(max_iters=16, ema_decay=0.5, sample_every=8, sample_steps=3, lr=2e-3)
    result = pipeline.pretrain("diffusion", shards, out, tiny32(), config, autoencoder=ae, progress=False)
    assert result.step == 16
    configs, modules = load_ldm(out / "model.safetensors")
    assert configs.unet is not None and set(modules) == {"first_stage", "unet"}
    # The exported UNet is the EMA kept in the last checkpoint, not the raw weights.
    last = load_checkpoint(out / "ckpt-00000016.safetensors")
    exported = load_checkpoint(out / "model.safetensors")
    ema = module_state(last, "ema")
    for name, tensor in module_state(exported, "unet").items():
        assert torch.equal(tensor, ema[name.replace(".", "__")]), name
    assert not all(
        torch.equal(module_state(last, "unet")[k], module_state(exported, "unet")[k])
        for k in module_state(exported, "unet")
    )
    # Fixed (t, noise) evaluation: the trained UNet predicts the noise better than an untrained one.
    batch = _first_batch(shards)
    from midms_cli.diffusion.schedule import NoiseSchedule
    from midms_cli.models.unet import UNetModel

    def eval_loss(unet):
        objective = pipeline.DiffusionObjective(
            modules["first_stage"], unet.eval(), NoiseSchedule(configs.diffusion)
        )
        torch.manual_seed(7)
        with torch.no_grad():
            return float(sum(objective(batch)["loss"] for _ in range(8)))

    torch.manual_seed(1)
    assert eval_loss(modules["unet"]) < 0.9 * eval_loss(UNetModel(configs.unet))
    grid = Image.open(out / "samples" / "step-00000016.png")
    assert grid.size == (3 * SIZE, 2 * SIZE)  # ground truth | reconstruction | DDIM sample


class _Crash(Exception):
    """A hard stop (power loss, SIGKILL): no checkpoint is written on the way out."""


def test_diffusion_run_crashed_after_a_checkpoint_resumes_to_the_uninterrupted_state(shards, tmp_path):
    # An untrained exported first stage is enough: the test pins the loop state, not the quality.
    torch.manual_seed(0)
    first_stage = tmp_path / "ae.safetensors"
    pipeline.build_autoencoder_task(tiny32(), _config(), {}).export(first_stage)
    config = _config(ema_decay=0.5, sample_every=0, sample_steps=2)

    def run(out: Path, on_step=None):
        return pipeline.pretrain("diffusion", shards, out, tiny32(), config, autoencoder=first_stage,
                                 progress=False, on_step=on_step)

    straight = run(tmp_path / "straight")

    def crash_at_three(step: int) -> None:
        if step == 3:
            raise _Crash

    out = tmp_path / "crashed"
    with pytest.raises(_Crash):
        run(out, crash_at_three)
    assert json.loads((out / "latest").read_text())["step"] == 2  # step 3 was lost with the crash
    resumed = run(out)
    assert resumed.step == 4 and resumed.last_losses == straight.last_losses
    # UNet, its EMA, optimizer moments and the exported EMA model all equal the uninterrupted run's.
    for name in ("ckpt-00000004.safetensors", "model.safetensors"):
        a = load_checkpoint(tmp_path / "straight" / name).tensors
        b = load_checkpoint(out / name).tensors
        assert a.keys() == b.keys() and any(k.startswith("ema.") for k in a) == (name != "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name
    steps = [json.loads(line)["step"] for line in (out / METRICS_FILE).read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert Image.open(out / "samples" / "step-00000004.png").size == (3 * SIZE, 2 * SIZE)


def _poison(monkeypatch, bad_calls: set[int]) -> list[int]:
    """Make the autoencoder objective return NaN on the given (1-based) forward calls."""
    calls = []
    original = pipeline.AutoencoderObjective.forward

    def forward(self, batch):
        out = original(self, batch)
        calls.append(len(calls) + 1)
        if calls[-1] in bad_calls:
            out = {k: v * float("nan") for k, v in out.items()}
        return out

    monkeypatch.setattr(pipeline.AutoencoderObjective, "forward", forward)
    return calls


def test_nonfinite_loss_skips_the_step_and_is_counted(shards, tmp_path, monkeypatch):
    _poison(monkeypatch, {2, 3})
    out = tmp_path / "nan"
    checksums = []
    model_holder = {}
    original_build = pipeline.build_autoencoder_task

    def build(*args, **kwargs):
        task = original_build(*args, **kwargs)
        model_holder["model"] = task.model
        return task

    monkeypatch.setattr(pipeline, "build_autoencoder_task", build)
    result = pipeline.pretrain(
        "autoencoder",
        shards,
        out,
        tiny32(),
        _config(nan_patience=3),
        progress=False,
        on_step=lambda step: checksums.append(parameter_checksum(model_holder["model"])),
    )
    assert result.step == 4 and result.nonfinite_skipped == 2
    # Steps 2 and 3 were skipped: the parameters after them equal those after step 1.
    assert checksums[0] == checksums[1] == checksums[2] != checksums[3]
    assert [
        json.loads(line)["nonfinite_skipped"] for line in (out / METRICS_FILE).read_text().splitlines()
    ] == [0, 1, 2, 2]


def test_repeated_nonfinite_losses_stop_with_a_clear_message(shards, tmp_path, monkeypatch):
    _poison(monkeypatch, {2, 3, 4})
    with pytest.raises(MidmsError, match=r"NaN/inf for 3 steps in a row.*nan_patience"):
        pipeline.pretrain(
            "autoencoder",
            shards,
            tmp_path / "stop",
            tiny32(),
            _config(nan_patience=3, max_iters=6),
            progress=False,
        )


def test_gradient_accumulation_of_two_micro_batches_matches_one_full_batch(shards, tmp_path):
    """Accumulating 2 micro-batches of 1 sample = one step on both samples (same data, same order)."""
    runs = {}
    for name, batch, accumulation in (("full", 2, 1), ("acc", 1, 2)):
        pipeline.pretrain(
            "autoencoder",
            shards,
            tmp_path / name,
            tiny32(),
            _config(
                max_iters=3,
                checkpoint_every=100,
                sample_every=0,
                batch_size=batch,
                grad_accumulation=accumulation,
            ),
            progress=False,
            trace=True,
        )
        runs[name] = [
            json.loads(line) for line in (tmp_path / name / "trace-rank0.jsonl").read_text().splitlines()
        ]
    for full, acc in zip(runs["full"], runs["acc"], strict=True):
        assert acc["keys"] == full["keys"][1:]  # the trace names the last micro-batch
        assert acc["loss"] == pytest.approx(full["loss"], rel=1e-4)
    a = load_checkpoint(tmp_path / "full" / "model.safetensors").tensors
    b = load_checkpoint(tmp_path / "acc" / "model.safetensors").tensors
    # Adam turns float-rounding differences of near-zero gradients into steps of up to lr = 1e-3.
    assert all(torch.allclose(a[k], b[k], atol=3e-3) for k in a)


def test_cli_dry_run_prints_the_resolved_config_and_writes_nothing(shards, tmp_path):
    from typer.testing import CliRunner

    from midms_cli.cli.app import app

    out = tmp_path / "dry"
    result = CliRunner().invoke(
        app,
        ["pretrain", "autoencoder", "--data", str(shards), "--out", str(out), "--iters", "7", "--dry-run"],
    )
    assert result.exit_code == 0, result.output
    config = json.loads(result.stdout)
    assert config["pretrain"]["max_iters"] == 7 and config["pretrain"]["model"] == "autoencoder"
    assert config["model"]["name"] == "tiny"
    assert not out.exists()


def test_cli_missing_autoencoder_is_one_line_error(shards, tmp_path):
    from midms_cli.cli.app import main

    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "pretrain",
                "diffusion",
                "--data",
                str(shards),
                "--autoencoder",
                str(tmp_path / "nope"),
                "--out",
                str(tmp_path / "ldm"),
                "--iters",
                "1",
            ]
        )
    assert exit_info.value.code == 2
