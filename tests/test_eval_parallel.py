"""`midms eval` under torchrun: two CPU processes (gloo) give the one-process files and numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from midms_cli.config import CorrespondenceConfig
from midms_cli.data.registry import get_plugin
from midms_cli.models.midm import MIDM
from midms_cli.pipelines.prepare import PrepareConfig, prepare
from midms_cli.pipelines.translate import save_midm
from midms_cli.presets import preset


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_parallel")
    config = PrepareConfig(dataset="synthfaces", out=root / "shards", size=32, splits=("val",), limit=5,
                           shard_size=2, options={"variant": "canny", "val_count": 5})  # fmt: skip
    prepare(config, get_plugin("synthfaces"))
    torch.manual_seed(0)
    model_config = preset("tiny")
    model_config.image_size = 32
    model_config.condition = "canny"
    model_config.sampling.refine = "none"
    model_config.autoencoder.resolution = 32
    model_config.autoencoder.num_res_blocks, model_config.autoencoder.ch_mult = 1, (1, 1, 1)
    model_config.unet.image_size = 8
    model_config.unet.channel_mult, model_config.unet.attention_resolutions = (1, 1), ()
    model_config.correspondence = CorrespondenceConfig(
        channels=16, stem_channels=(8, 16, 16), trunk_blocks=1, spade_hidden=16, cond_channels=1
    )
    save_midm(root / "model.safetensors", MIDM(model_config))
    return root


def _evaluate(root, out, processes, batch_size):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [*launcher, "-m", "midms_cli", "--json", "eval", "--model", str(root / "model.safetensors"),
               "--data", str(root / "shards"), "--diversity", "1", "--baselines", "--seeds", "2",
               "--metrics", "oracle,swd", "--batch-size", str(batch_size), "--seed", "4", "-o", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip())  # one result object: from the main process only


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def test_two_processes_give_the_numbers_and_images_of_one(setup, tmp_path):
    # 10 pairs (5 own + 5 diversity) in batches of 3: 4 batches, the last one short, two rounds of two.
    one = _evaluate(setup, tmp_path / "one", 1, 3)
    two = _evaluate(setup, tmp_path / "two", 2, 3)
    assert two["results"] == one["results"]  # every metric of every method and seed, exactly
    assert set(one["results"]["methods"]) >= {"model", "initial_warp", "exemplar_copy", "ceiling"}
    assert one["results"]["methods"]["model"]["swd_oracle"] > 0
    files = _files(tmp_path / "one")
    assert len(files) > 10 and _files(tmp_path / "two") == files
    for name in ("results.json", "pairs.txt"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()


def test_more_processes_than_batches_leave_the_extra_ones_idle(setup, tmp_path):
    one = _evaluate(setup, tmp_path / "one", 1, 8)
    three = _evaluate(setup, tmp_path / "three", 3, 8)  # 2 batches over 3 processes
    assert three["results"] == one["results"]
    assert _files(tmp_path / "three") == _files(tmp_path / "one")


def test_folder_mode_under_torchrun_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    from midms_cli.cli.app import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(SystemExit) as info:
        main(["eval", "--real", str(tmp_path / "a"), "--fake", str(tmp_path / "b"),
              "-o", str(tmp_path / "e")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "runs in one process" in err and len(err.strip().splitlines()) == 1
