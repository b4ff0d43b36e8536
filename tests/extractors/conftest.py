"""Extractor tests run many tiny convolutions: one intra-op thread avoids OpenMP spin contention on
shared 2-core machines (a 40x48 forward takes ~0.03 s on one thread, seconds on two under load)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
