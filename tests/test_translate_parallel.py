"""`midms translate --pairs` under torchrun: two CPU processes (gloo) give the one-process images."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from test_translate import SIZE, micro_config  # the same micro model as the one-process tests

from midms_cli import distributed
from midms_cli.models.midm import MIDM
from midms_cli.pipelines.translate import save_midm


@pytest.mark.parametrize("count, world", [(0, 2), (1, 2), (5, 2), (7, 3), (4, 4), (3, 5)])
def test_rank_shares_are_ordered_contiguous_blocks_covering_every_item(count, world):
    shares = [distributed.rank_share(count, rank, world) for rank in range(world)]
    assert [i for share in shares for i in share] == list(range(count))
    sizes = [len(share) for share in shares]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_gather_in_one_process_is_the_object_itself():
    assert distributed.gather_to_main({"a": 1}) == [{"a": 1}]


def _inputs(root):
    torch.manual_seed(0)
    save_midm(root / "model.safetensors", MIDM(micro_config()))
    rng = np.random.default_rng(0)
    lines = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / f"ref{i}.png")
        edges = np.zeros((SIZE, SIZE), dtype=np.uint8)
        edges[4 + 3 * i: 20 + 3 * i, 10 + i] = 255
        Image.fromarray(edges).save(root / f"cond{i}.png")
    # Five pairs over two exemplars: rank 0 gets three, rank 1 two, and a shared exemplar spans the cut.
    for cond, ref in ((0, 0), (1, 0), (2, 1), (0, 1), (1, 2)):
        lines.append(f"{root / f'cond{cond}.png'} {root / f'ref{ref}.png'}")
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")


def _translate(root, out_dir, processes):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [*launcher, "-m", "midms_cli", "--json", "translate", "--pairs", str(root / "pairs.txt"),
               "--out-dir", str(out_dir), "--model", str(root / "model.safetensors"), "--seed", "3"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip())  # one result object: from the main process only


def test_two_processes_write_the_images_of_one_process(tmp_path):
    _inputs(tmp_path)
    one = _translate(tmp_path, tmp_path / "one", 1)
    two = _translate(tmp_path, tmp_path / "two", 2)
    assert len(two["outputs"]) == 5
    assert [r["condition"] for r in two["outputs"]] == [r["condition"] for r in one["outputs"]]
    assert [r["exemplar"] for r in two["outputs"]] == [r["exemplar"] for r in one["outputs"]]
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir()) and len(names) == 5
    for name in names:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def test_a_bad_input_fails_every_process_before_any_output(tmp_path):
    _inputs(tmp_path)
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(pairs.read_text() + f"{tmp_path / 'cond0.png'} {tmp_path / 'missing.png'}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "midms_cli", "translate", "--pairs", str(pairs), "--out-dir", str(tmp_path / "out"),
               "--model", str(tmp_path / "model.safetensors")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "missing.png" in done.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
