"""The training data as a pure function of (seed, micro-step, rank): seeds, segments, loaders.

Resuming needs no RNG history: the batch of micro-step i comes from a loader seeded by the segment
i falls in, and the model's random draws of a step are seeded from (seed, step, rank).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from midms_cli.checkpoint import get_rng_state, set_rng_state
from midms_cli.errors import MidmsError

# Micro-batches per data segment (see DataStream): fixed, so the data order of a run does not
# depend on how often it saves; a run records the value and keeps it when resumed.
DATA_SEGMENT = 256


def step_seed(seed: int, step: int, rank: int, stream: int = 0) -> int:
    """A 63-bit seed that depends only on (seed, step, rank, stream): resume needs no RNG history."""
    value = (seed * 1_000_003 + step) * 1_009 + rank
    value = value * 31 + stream
    return value % (2**63 - 1)


def seed_everything(value: int) -> None:
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


@contextlib.contextmanager
def _isolated_rng(holder: dict[str, Any]) -> Iterator[None]:
    """Run with the RNG states kept in `holder` and leave the global ones untouched.

    The data pipeline may draw random numbers (shuffling, worker seeds); isolating it keeps the
    model's random stream identical whether the loader was just rebuilt (resume) or not.
    """
    outer = get_rng_state()
    set_rng_state(holder["rng"])
    try:
        yield
    finally:
        holder["rng"] = get_rng_state()
        set_rng_state(outer)


class DataStream:
    """Micro-batches as a pure function of (seed, micro-step index, rank).

    The stream is cut into segments of `segment` micro-batches; each segment is a fresh loader
    seeded from (seed, segment, rank). Resuming mid-segment rebuilds it and skips what was consumed.
    The segment length is part of the run (recorded in its training state), not of how often it
    saves, so any checkpoint interval gives the same batches.
    """

    def __init__(self, make_loader: Callable[[int], Iterable], seed: int, segment: int, rank: int) -> None:
        self.make_loader = make_loader
        self.seed, self.segment, self.rank = seed, max(1, segment), rank
        self._iterator: Iterator | None = None
        self._position = -1  # micro-step index of the next batch the iterator yields
        self._rng: dict[str, Any] = {}

    def _start(self, index: int) -> None:
        segment_index = index // self.segment
        seed = step_seed(self.seed, segment_index, self.rank, stream=1)
        outer = get_rng_state()
        seed_everything(seed)
        self._rng = {"rng": get_rng_state()}  # the data's own random stream for this segment
        set_rng_state(outer)
        with _isolated_rng(self._rng):
            self._iterator = iter(self.make_loader(seed % 2**31))
            start = segment_index * self.segment
            for _ in range(index - start):
                next(self._iterator)
        self._position = index

    def batch(self, index: int) -> dict[str, Any]:
        """The micro-batch with global index `index` (consecutive calls are cheap)."""
        if self._iterator is None or index != self._position or index % self.segment == 0:
            self._start(index)
        with _isolated_rng(self._rng):
            try:
                batch = next(self._iterator)
            except StopIteration:
                raise MidmsError("the training data ran out; prepare more samples") from None
        self._position = index + 1
        return batch


def endless_epochs(loader: Iterable, batch_size: int) -> Iterator[dict[str, Any]]:
    """Full batches of `loader`, epoch after epoch (each new pass re-shuffles); short last batches dropped."""
    while True:
        produced = False
        for batch in loader:
            if len(batch["meta"]) == batch_size:
                produced = True
                yield batch
        if not produced:
            raise MidmsError(
                f"this process's share of the training shards holds fewer than {batch_size} samples; "
                "prepare more samples or shards, or lower the batch size / number of processes"
            )


def shard_loader(
    data: Path,
    split: str,
    batch_size: int,
    num_workers: int = 0,
    *,
    load_size: int = 0,
    flip: bool = False,
    self_pair_window: str = "shared",
) -> Callable[[int], Iterable]:
    """A loader factory over WebDataset shards: seed -> an endless per-rank batch stream.

    Each rank reads only its own shards (split by node and worker), pass after pass, so ranks see
    disjoint data and none runs dry before another (no hang on uneven shards). load_size / flip:
    the official augmentation (`crop_and_flip`; 0 / False: none); self_pair_window: its exemplar window
    of a self pair.
    """
    from midms_cli.data import shards  # looked up when called: tests wrap shards.make_loader

    def make(seed: int) -> Iterable:
        loader = shards.make_loader(
            data, split, batch_size, shuffle=True, resample=False, seed=seed, num_workers=num_workers,
            flip=flip, load_size=load_size or None, self_pair_window=self_pair_window,
        )
        return endless_epochs(loader, batch_size)

    return make
