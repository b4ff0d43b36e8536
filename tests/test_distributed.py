"""Distributed helpers: one-process fallback, and a real 2-process gloo group on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from midms_cli import distributed
from midms_cli.errors import MidmsError

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def single_process(monkeypatch):
    for name in _TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)


def test_one_process_fallback(single_process, capsys):
    assert distributed.init() is False
    assert not torch.distributed.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.local_rank()) == (0, 1, 0)
    assert distributed.is_main()
    distributed.barrier()
    x = torch.tensor([1.0, 2.0])
    mean = distributed.all_reduce_mean(x)
    assert torch.equal(mean, x) and mean is not x
    assert distributed.all_reduce_mean(torch.tensor([3, 4])).dtype == torch.float32
    distributed.print0("hello", 3)
    assert capsys.readouterr().out == "hello 3\n"
    assert distributed.device_for_rank() == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    distributed.cleanup()


def test_world_size_one_under_torchrun_makes_no_group(single_process, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.init() is False and not torch.distributed.is_initialized()


def test_incomplete_torchrun_environment_is_a_user_error(single_process, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(MidmsError, match="MASTER_ADDR, MASTER_PORT not set; launch with `torchrun"):
        distributed.init()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(MidmsError, match="WORLD_SIZE='two' is not an integer"):
        distributed.init()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_WORKER = textwrap.dedent(
    """
    import json, torch
    from midms_cli import distributed
    assert distributed.init() is True
    r = distributed.rank()
    x = torch.tensor([float(r + 1), 10.0 * r, 7.0])
    mean = distributed.all_reduce_mean(x)
    distributed.barrier()
    distributed.print0("main says hi")
    print(json.dumps({"rank": r, "world": distributed.world_size(), "local": distributed.local_rank(),
                      "main": distributed.is_main(), "mean": mean.tolist(), "input": x.tolist(),
                      "device": str(distributed.device_for_rank()),
                      "backend": torch.distributed.get_backend()}))
    distributed.cleanup()
    assert not torch.distributed.is_initialized()
    """
)


def test_two_gloo_processes_all_reduce_to_the_mean():
    port = _free_port()
    processes = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        processes.append(subprocess.Popen([sys.executable, "-c", _WORKER], env=env, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outputs = []
    for process in processes:
        try:
            out, err = process.communicate(timeout=120)
        finally:
            process.kill()
        assert process.returncode == 0, err
        outputs.append(out.strip().splitlines())
    assert outputs[0][0] == "main says hi" and len(outputs[1]) == 1  # print0 only on rank 0
    results = [json.loads(lines[-1]) for lines in outputs]
    for rank, result in enumerate(results):
        assert result["rank"] == rank and result["world"] == 2 and result["local"] == rank
        assert result["main"] is (rank == 0)
        assert result["backend"] == "gloo" and result["device"] == "cpu"
        # mean of [1, 0, 7] and [2, 10, 7]; the input tensor itself is untouched
        assert result["mean"] == [1.5, 5.0, 7.0]
        assert result["input"] == [float(rank + 1), 10.0 * rank, 7.0]
