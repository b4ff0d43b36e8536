"""Data-parallel translation under torchrun: each process translates its share of the pairs.

`torchrun --nproc_per_node=N -m midms_cli translate --pairs FILE --out-dir DIR` (or over several
machines with `--nnodes`, `--node_rank` and a rendezvous address) starts N processes; each checks
every input before any output is written, translates one contiguous block of the pairs on its
own device (cuda:LOCAL_RANK, else the CPU) and writes those outputs; the main process gathers the
records in the order of the pairs and reports them. Every pair is seeded on its own
(`translate_pairs`), so the images are those of a single process, whatever the number of processes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from midms_cli import distributed
from midms_cli.devices import resolve_device
from midms_cli.pipelines.translate import (
    MIDM,
    Pair,
    TranslateOptions,
    check_pairs,
    check_size,
    translate_pairs,
)


def rank_device(name: str) -> torch.device:
    """This process's device: with several processes, `auto`/`cuda` mean the GPU of its local rank."""
    if distributed.is_distributed() and name in ("auto", "cuda") and torch.cuda.is_available():
        return distributed.device_for_rank()
    return resolve_device(name)


def translate_pairs_data_parallel(
    model: MIDM, pairs: list[Pair], options: TranslateOptions, progress: Callable[[int], None] | None = None
) -> list[dict[str, Any]] | None:
    """This rank's share of `translate_pairs`; the records of all pairs, in order, on the main
    process (None on the others). A bad input anywhere fails every process before any output."""
    check_pairs(model, pairs, check_size(model, options.size), options.extract)
    share = distributed.rank_share(len(pairs))
    mine = translate_pairs(model, pairs[share.start:share.stop], options, progress) if len(share) else []
    gathered = distributed.gather_to_main(mine)
    if gathered is None:
        return None
    return [record for part in gathered for record in part]
