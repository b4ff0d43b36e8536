"""Two CPU processes under torchrun (gloo): disjoint data, identical parameters after every step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from midms_cli.checkpoint import save_modules
from midms_cli.config import ModelConfig
from midms_cli.models.autoencoder import build_autoencoder
from midms_cli.models.unet import UNetModel
from midms_cli.pipelines.pretrain import ldm_config
from midms_cli.presets import preset

SIZE = 32


def synthfaces_shards(base: Path) -> Path:
    """16 training samples in 2 shards at 32 px, made once per session (shared by the training tests)."""
    out = base / "training-shards"
    if not (out / "train" / "index.json").is_file():
        from midms_plugins.synthfaces import PLUGIN

        from midms_cli.pipelines.prepare import PrepareConfig, prepare

        prepare(PrepareConfig(dataset="synthfaces", out=out, size=SIZE, splits=("train",), limit=16,
                              shard_size=8), PLUGIN)
    return out


def tiny32_config() -> dict:
    config = preset("tiny")
    config.image_size = SIZE
    config.autoencoder.resolution = SIZE
    config.unet.image_size = SIZE // config.autoencoder.downsample
    config.training.warmup_iters = 3
    config.training.batch_size = 2
    config.training.lr_correspondence = 1e-3
    config.training.sample_every = 0
    config.training.log_every = 1
    config.training.load_size = 0  # the preset's load size belongs to its 64 px images
    return ModelConfig.from_dict(config.to_dict()).to_dict()


def _traces(out: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (out / f"trace-rank{rank}.jsonl").read_text().splitlines()]


def test_two_processes_train_on_disjoint_data_with_identical_parameters(tmp_path_factory, tmp_path):
    shards = synthfaces_shards(tmp_path_factory.getbasetemp())
    config = ModelConfig.from_dict(tiny32_config())
    base = tmp_path / "base.safetensors"
    torch.manual_seed(0)
    save_modules(base, {"first_stage": build_autoencoder(config.autoencoder), "unet": UNetModel(config.unet)},
                 ldm_config(config, with_unet=True), "ldm")
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config.to_dict()))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "midms_cli", "--json", "warmup", "--data", str(shards), "--base", str(base),
               "--out", str(out), "--config", str(config_file), "--trace"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # One result line, from rank 0 only.
    result = json.loads(done.stdout.strip())
    assert result["step"] == 3 and result["model"] == str(out / "model.safetensors")
    rank0, rank1 = _traces(out, 0), _traces(out, 1)
    assert [r["step"] for r in rank0] == [r["step"] for r in rank1] == [1, 2, 3]
    for a, b in zip(rank0, rank1, strict=True):
        assert len(a["keys"]) == len(b["keys"]) == 2
        assert not set(a["keys"]) & set(b["keys"]), "ranks saw the same sample"
        assert a["checksum"] == b["checksum"], f"replicas differ after step {a['step']}"
        assert a["loss"] != b["loss"]  # different data, so different local losses
    # Over the whole run too: each rank reads only its own shard (split by node).
    keys0 = {k for r in rank0 for k in r["keys"]}
    keys1 = {k for r in rank1 for k in r["keys"]}
    assert not keys0 & keys1
    assert len({r["checksum"] for r in rank0}) == 3  # and the parameters do move
    # Metrics and checkpoints are written once, by rank 0.
    assert (out / "metrics.jsonl").read_text().count("\n") == 3
    assert (out / "model.safetensors").is_file()

