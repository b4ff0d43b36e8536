"""Killed anywhere, resumed to the same result: prepare, pretrain, warm-up and train.

A forked child runs the command and dies with os._exit (no cleanup, as under kill -9) at one write
boundary of `midms_cli.atomic` (temporary file created, complete, renamed); the same command then
runs again in this process. It must finish, equal an uninterrupted run bit for bit, and leave no
temporary file. A few real SIGKILLs of the CLI at random moments pin the same for a whole process,
and Ctrl-C must exit with 130 after saving a checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from midms_cli.atomic import is_temporary, set_fault_hook
from midms_cli.checkpoint import RunDir, load_checkpoint, save_modules
from midms_cli.config import LossConfig, ModelConfig
from midms_cli.pipelines import pretrain as pretraining
from midms_cli.pipelines import train as training
from midms_cli.pipelines.loop import METRICS_FILE
from midms_cli.pipelines.prepare import PrepareConfig, prepare
from midms_cli.presets import preset

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the boundary kills fork the test process")

SIZE = 32
KILLED = 137  # the exit status the child reports when it dies at its boundary


def _plugin():
    from midms_plugins.synthfaces import PLUGIN

    return PLUGIN


def _prepare_config(out: Path) -> PrepareConfig:
    return PrepareConfig(dataset="synthfaces", out=out, size=SIZE, splits=("train",), limit=8, shard_size=4)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kill") / "shards"
    prepare(_prepare_config(out), _plugin())
    return out


def tiny32(**training_values) -> ModelConfig:
    """The tiny preset at 32 px, batch 2, no sample grids, a checkpoint every step."""
    config = preset("tiny")
    config.image_size = SIZE
    config.autoencoder.resolution = SIZE
    config.unet.image_size = SIZE // config.autoencoder.downsample
    config.training.losses.perceptual = LossConfig().perceptual
    values = {"batch_size": 2, "sample_every": 0, "checkpoint_every": 1, "log_every": 1, "load_size": 0,
              "flip": False, **training_values}
    for name, value in values.items():
        setattr(config.training, name, value)
    return ModelConfig.from_dict(config.to_dict())


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from midms_cli.models.autoencoder import build_autoencoder
    from midms_cli.models.unet import UNetModel
    from midms_cli.pipelines.pretrain import ldm_config

    path = tmp_path_factory.mktemp("kill-base") / "ldm.safetensors"
    config = tiny32()
    torch.manual_seed(0)
    modules = {"first_stage": build_autoencoder(config.autoencoder), "unet": UNetModel(config.unet)}
    save_modules(path, modules, ldm_config(config, with_unet=True), "ldm")
    return path


# --------------------------------------------------------------------------------------------
# Helpers


def recorded_boundaries(run: Callable[[], object]) -> list[tuple[str, str]]:
    """Run once, uninterrupted, noting every write boundary as (event, file name)."""
    seen: list[tuple[str, str]] = []
    set_fault_hook(lambda event, path: seen.append((event, path.name)))
    try:
        run()
    finally:
        set_fault_hook(None)
    return seen


def killed_at(boundary: int, run: Callable[[], object]) -> int:
    """Run in a forked child that dies at write boundary number `boundary` (0-based); its exit code."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            seen = 0

            def hook(event: str, path: Path) -> None:
                nonlocal seen
                if seen == boundary:
                    os._exit(KILLED)
                seen += 1

            set_fault_hook(hook)
            run()
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and is_temporary(p)]


def first_checkpoint_boundaries(events: list[tuple[str, str]]) -> list[int]:
    """Indices of every boundary of the first checkpoint, its state file and its pointer."""
    first = next(i for i, (_, name) in enumerate(events) if name.startswith(".ckpt-"))
    pointer = next(i for i, (event, name) in enumerate(events) if i > first and event == "renamed"
                   and name == "latest")
    return list(range(first, pointer + 1))


def same_model(a: Path, b: Path) -> bool:
    ta, tb = load_checkpoint(a).tensors, load_checkpoint(b).tensors
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def metric_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / METRICS_FILE).read_text().splitlines()]


def check_resumed(run: Callable[[Path], object], reference: Path, out: Path, what: object) -> None:
    """Run again on `out`: the uninterrupted result, each step logged once, no temporary left."""
    run(out)
    assert same_model(reference / "model.safetensors", out / "model.safetensors"), what
    assert metric_steps(out) == metric_steps(reference), what
    assert temporaries(out) == [], what


def check_kill_then_resume(
    run: Callable[[Path], object],
    reference: Path,
    out: Path,
    boundary: int,
    events: list[tuple[str, str]],
    between: Callable[[Path], None] | None = None,
) -> None:
    reached = killed_at(boundary, lambda: run(out))
    assert reached == KILLED, f"the run did not reach boundary {events[boundary]}"
    if between is not None:
        between(out)
    run(out)
    assert same_model(reference / "model.safetensors", out / "model.safetensors"), events[boundary]
    assert metric_steps(out) == metric_steps(reference), events[boundary]
    assert temporaries(out) == [], events[boundary]


# --------------------------------------------------------------------------------------------
# prepare


def _digests(split: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(split.glob("shard-*.tar"))}


def test_prepare_killed_at_every_write_boundary_resumes_to_the_same_shards(shards, tmp_path):
    events = recorded_boundaries(lambda: prepare(_prepare_config(tmp_path / "recorded"), _plugin()))
    # prepare.json, two shards and index.json: each created, completed and renamed.
    assert len(events) == 12 and {e for e, _ in events} == {"open", "written", "renamed"}
    reference = json.loads((shards / "train" / "index.json").read_text())["shards"]
    for boundary in range(len(events)):
        out = tmp_path / f"killed-{boundary}"
        assert killed_at(boundary, lambda out=out: prepare(_prepare_config(out), _plugin())) == KILLED
        prepare(_prepare_config(out), _plugin())
        assert _digests(out / "train") == _digests(shards / "train"), events[boundary]
        assert json.loads((out / "train" / "index.json").read_text())["shards"] == reference
        assert temporaries(out) == [], events[boundary]


# --------------------------------------------------------------------------------------------
# pretrain, warm-up, train


def _pretrain_run(shards: Path) -> Callable[[Path], object]:
    config = pretraining.PretrainConfig(batch_size=2, max_iters=3, checkpoint_every=1, sample_every=0,
                                        log_every=1, lr=1e-3)
    return lambda out: pretraining.pretrain("autoencoder", shards, out, tiny32(), config, progress=False)


def test_pretrain_killed_at_each_boundary_of_the_first_checkpoint_and_later_resumes_exactly(shards, tmp_path):
    run = _pretrain_run(shards)
    reference = tmp_path / "reference"
    events = recorded_boundaries(lambda: run(reference))
    first = first_checkpoint_boundaries(events)
    assert [event for event, _ in (events[i] for i in first)] == ["open", "written", "renamed"] * 3

    def checkpoint_without_state(out: Path) -> None:
        """Killed as the first state file appears: a checkpoint alone, which is no step to resume from."""
        assert [p.name for p in out.glob("[!.]*.safetensors")] == ["ckpt-00000001.safetensors"]
        assert RunDir(out).latest_resumable() is None and RunDir(out).latest_step() == 1
        assert temporaries(out) != []  # what the kill left: the state file's temporary

    # The first checkpoint created and complete, its state created (see above) and complete, its
    # pointer complete; later, the exported model complete but not yet renamed.
    exported = max(i for i, (event, name) in enumerate(events)
                   if name.startswith(".model.") and event == "written")
    for boundary in (first[0], first[1], first[3], first[4], first[7], exported):
        between = checkpoint_without_state if boundary == first[3] else None
        check_kill_then_resume(run, reference, tmp_path / f"killed-{boundary}", boundary, events, between)


def _phase_run(phase: str, shards: Path, base: Path, tmp_path: Path) -> Callable[[Path], object]:
    if phase == "warmup":
        return lambda out: training.warmup(shards, out, tiny32(warmup_iters=2), base, progress=False)
    init = tmp_path / "init.safetensors"
    torch.manual_seed(1)
    save_modules(init, training.model_from_base(tiny32(), base).modules_to_save(), tiny32(), "midms")
    config = tiny32(warmup_iters=0, max_iters=2)
    return lambda out: training.run_phase("e2e", shards, out, config, init=init, progress=False)


@pytest.mark.parametrize("phase", ["warmup", "e2e"])
def test_warmup_and_train_killed_as_the_first_state_file_appears_resume_exactly(
    phase, shards, base, tmp_path
):
    run = _phase_run(phase, shards, base, tmp_path)
    reference = tmp_path / "reference"
    events = recorded_boundaries(lambda: run(reference))
    boundary = next(i for i in first_checkpoint_boundaries(events) if events[i][1].startswith(".state-"))
    check_kill_then_resume(run, reference, tmp_path / "killed", boundary, events)


def sigkilled(run: Callable[[], object], ready: Callable[[], bool], delay: float) -> None:
    """Run in a forked child and SIGKILL it `delay` seconds after `ready()` first holds."""
    pid = os.fork()
    if pid == 0:
        try:
            run()
        finally:
            os._exit(0)
    deadline = time.monotonic() + 120
    while not ready() and time.monotonic() < deadline and os.waitpid(pid, os.WNOHANG) == (0, 0):
        time.sleep(0.005)
    time.sleep(delay)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_at_a_random_moment_then_resume(seed, shards, base, tmp_path):
    """kill -9 at a random moment (not at a chosen boundary) of prepare, pretrain and the warm-up."""
    rng = random.Random(seed)
    out = tmp_path / "prepared"
    sigkilled(lambda: prepare(_prepare_config(out), _plugin()), lambda: out.exists(), rng.uniform(0, 0.3))
    prepare(_prepare_config(out), _plugin())
    assert _digests(out / "train") == _digests(shards / "train") and temporaries(out) == []
    runs = {"pretrain": _pretrain_run(shards), "warmup": _phase_run("warmup", shards, base, tmp_path)}
    for what, run in runs.items():
        reference, killed = tmp_path / f"{what}-reference", tmp_path / f"{what}-killed"
        run(reference)
        delay = rng.uniform(0, 0.6)
        started = killed / "config.json"
        sigkilled(lambda run=run, killed=killed: run(killed), started.exists, delay)
        check_resumed(run, reference, killed, (what, delay))


# --------------------------------------------------------------------------------------------
# Real processes: SIGKILL at random moments, Ctrl-C


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "midms_cli", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def _sigkill_when(command: list[str], ready: Callable[[], bool], delay: float) -> None:
    """Start `command`, wait until `ready()`, then `delay` seconds, then SIGKILL it (if still running)."""
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600  # a loaded machine may take minutes to start torch
        while not ready() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)


@pytest.fixture(scope="module")
def shards64(tmp_path_factory) -> Path:
    """Shards at the tiny preset's own 64 px, for the commands run through the CLI."""
    out = tmp_path_factory.mktemp("kill64") / "shards"
    prepare(PrepareConfig(dataset="synthfaces", out=out, size=64, splits=("train",), limit=4, shard_size=2),
            _plugin())
    return out


def _cli_pretrain_args(data: Path, out: Path, iters: int) -> list[str]:
    return ["pretrain", "autoencoder", "--data", str(data), "--out", str(out), "--iters", str(iters),
            "--batch-size", "2", "--checkpoint-every", "1", "--sample-every", "0", "--lr", "1e-3"]


def test_the_cli_killed_at_a_random_moment_resumes_to_the_uninterrupted_result(shards64, tmp_path, capsys):
    from midms_cli.cli.app import main

    reference = tmp_path / "reference"
    config = pretraining.PretrainConfig(model="autoencoder", batch_size=2, max_iters=3, checkpoint_every=1,
                                        sample_every=0, lr=1e-3)
    pretraining.pretrain("autoencoder", shards64, reference, preset("tiny"), config, progress=False)
    run = tmp_path / "run"
    args = _cli_pretrain_args(shards64, run, 3)
    _sigkill_when(_cli(*args), lambda: any(run.glob(".ckpt-*")) or any(run.glob("ckpt-*")),
                  random.Random(19).uniform(0, 0.5))
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0, capsys.readouterr().err
    assert same_model(reference / "model.safetensors", run / "model.safetensors")
    assert metric_steps(run) == metric_steps(reference) and temporaries(run) == []


def test_ctrl_c_during_training_exits_130_with_a_checkpoint_saved(shards64, tmp_path, monkeypatch, capsys):
    from midms_cli.cli.app import main
    from midms_cli.pipelines import loop

    train_step = loop.Trainer.train_step

    def interrupted_at_two(self):
        result = train_step(self)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
        return result

    monkeypatch.setattr(loop.Trainer, "train_step", interrupted_at_two)
    out = tmp_path / "run"
    args = _cli_pretrain_args(shards64, out, 50)
    args[args.index("--checkpoint-every") + 1] = "100"
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 130
    saved = (out / "ckpt-00000002.safetensors", out / "state-00000002.safetensors")
    assert RunDir(out).latest_resumable() == saved
    assert not (out / "model.safetensors").exists()
    assert "interrupted" in capsys.readouterr().err
