"""The training and evaluation loader over WebDataset shards: per-rank, per-worker streams of batches.

Shards are split by node (rank) and by DataLoader worker, read with their sha256 checked
(`midms_cli.data.shards.read_shard`), shuffled in a buffer of raw samples, decoded, optionally
cropped and flipped (the official training augmentation), and collated.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from midms_cli.data.shards import (
    CONDITION_FIELDS,
    IMAGE_FIELDS,
    CorruptShard,
    ReadStats,
    check_shards,
    decode_sample,
    read_shard,
    shard_digests,
    stderr_report,
)
from midms_cli.errors import MidmsError


def node_and_worker() -> tuple[int, int]:
    """(rank, world size) of this process: torch.distributed when initialised, else torchrun's
    RANK / WORLD_SIZE environment variables, else a single process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def assigned_shards(shards: list[Path], rank: int, world: int, worker: int, workers: int) -> list[Path]:
    """split_by_node then split_by_worker: rank r takes shards r, r+world, ...; its worker w every
    `workers`-th of those. Disjoint across (rank, worker); together they cover every shard."""
    return shards[rank::world][worker::workers]


def shuffled(items: Iterable[Any], buffer: int, rng: random.Random) -> Iterator[Any]:
    """Streaming shuffle with a fixed-size buffer (as webdataset's `shuffle`)."""
    pool: list[Any] = []
    for item in items:
        pool.append(item)
        if len(pool) >= buffer:
            i = rng.randrange(len(pool))
            pool[i], pool[-1] = pool[-1], pool[i]
            yield pool.pop()
    rng.shuffle(pool)
    yield from pool


def _resized(name: str, value: Any, size: int) -> Any:
    """One field of a sample at size x size: photos bilinear, condition maps nearest, the rest unchanged."""
    if name not in IMAGE_FIELDS + CONDITION_FIELDS or value.shape[-2:] == (size, size):
        return value
    mode = "nearest" if name in CONDITION_FIELDS else "bilinear"
    return torch.nn.functional.interpolate(value[None], size=(size, size), mode=mode)[0]


SELF_PAIR_WINDOWS = ("shared", "own")


def crop_and_flip(
    sample: dict[str, Any],
    crop: int | None,
    flip: bool,
    rng: random.Random,
    load_size: int | None = None,
    self_pair_window: str = "shared",
) -> dict[str, Any]:
    """The official training augmentation: a random `crop` x `crop` window and a horizontal flip (p = 0.5).

    With `load_size`, every picture is first resized to load_size x load_size (photos bilinear,
    condition maps nearest, so edges and one-hot labels stay binary) and `crop` defaults to the
    shard's own size: the official resize-286-crop-256 on shards stored at 256.
    The target (image, cond and the oracle, which is aligned with them) shares one draw; the exemplar
    (ref, ref_cond) gets its own, except for a self pair, whose exemplar is the target itself with the
    target's crop and flip (`self_pair_window` "shared", official) or with a draw of its own ("own":
    the identity is then only by chance the exact match of a pair). Unlike the official code, whose
    self pairs recompute the exemplar's condition with a fresh crop and flip, ref_cond stays aligned
    with ref.
    """
    size = sample["image"].shape[-1]
    crop = size if crop is None else crop
    if load_size is not None:
        if load_size < crop:
            raise MidmsError(f"load size {load_size} must be at least the crop size {crop}")
        sample = {name: _resized(name, value, load_size) for name, value in sample.items()}
        size = load_size
    if not 0 < crop <= size:
        raise MidmsError(f"crop {crop} must be between 1 and the shard image size {size}")

    def draw() -> tuple[int, int, bool]:
        return rng.randrange(size - crop + 1), rng.randrange(size - crop + 1), flip and rng.random() < 0.5

    def apply(tensor: torch.Tensor, window: tuple[int, int, bool]) -> torch.Tensor:
        top, left, mirrored = window
        tensor = tensor[..., top : top + crop, left : left + crop]
        return tensor.flip(-1) if mirrored else tensor

    if self_pair_window not in SELF_PAIR_WINDOWS:
        raise MidmsError(
            f"self_pair_window must be one of {', '.join(SELF_PAIR_WINDOWS)}, got {self_pair_window!r}"
        )
    target = draw()
    shared = sample["meta"].get("pairing") == "self" and self_pair_window == "shared"
    exemplar = target if shared else draw()
    out = dict(sample)
    for name in ("image", "cond", "oracle"):
        if name in sample:
            out[name] = apply(sample[name], target)
    for name in ("ref", "ref_cond"):
        out[name] = apply(sample[name], exemplar)
    return out


class ShardStream(torch.utils.data.IterableDataset):
    """Decoded samples of a split for one (rank, DataLoader worker).

    resample=True: an endless stream; each (rank, worker) draws shards at random with its own seed,
    so no rank runs out before another (no hang on uneven shards). resample=False: one pass over this
    (rank, worker)'s disjoint share. Raw samples are shuffled in a buffer before decoding, to keep
    the buffer small in memory.
    """

    def __init__(
        self,
        shards: list[Path],
        *,
        shuffle: bool,
        resample: bool,
        seed: int,
        buffer: int,
        strict: bool,
        rank: int,
        world: int,
        report: Callable[[str], None] = stderr_report,
        crop: int | None = None,
        flip: bool = False,
        load_size: int | None = None,
        digests: dict[str, str] | None = None,
        self_pair_window: str = "shared",
    ):
        super().__init__()
        self.crop, self.flip, self.load_size = crop, flip, load_size
        self.self_pair_window = self_pair_window
        self.digests = digests or {}
        self.shards, self.shuffle, self.resample, self.seed = shards, shuffle, resample, seed
        self.buffer, self.strict, self.rank, self.world, self.report = buffer, strict, rank, world, report
        self.epoch = 0
        self.stats = ReadStats()

    def _worker(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def _shard_order(self, rng: random.Random, worker: int, workers: int) -> Iterator[Path]:
        if self.resample:
            while True:
                usable = [s for s in self.shards if s.name not in self.stats.skipped_shards]
                if not usable:
                    raise MidmsError("every shard of this split is corrupt; re-run `midms prepare`")
                yield rng.choice(usable)
        mine = assigned_shards(self.shards, self.rank, self.world, worker, workers)
        if self.shuffle:
            rng.shuffle(mine)
        yield from mine

    def _raw_samples(self, order: Iterable[Path]) -> Iterator[dict[str, bytes]]:
        for path in order:
            try:
                for raw in read_shard(path, self.digests.get(path.name)):
                    raw["__shard__"] = path.name
                    yield raw
            except CorruptShard as exc:
                self._corrupt(path.name, exc)

    def _corrupt(self, name: str, exc: Exception) -> None:
        if self.strict:
            raise MidmsError(f"corrupt shard {exc}; re-run `midms prepare` to rebuild it") from exc
        if name not in self.stats.skipped_shards:
            self.stats.skipped_shards.append(name)
            self.report(f"warning: skipping corrupt shard {exc} ({len(self.stats.skipped_shards)} skipped)")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, workers = self._worker()
        rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{worker}")
        raw = self._raw_samples(self._shard_order(rng, worker, workers))
        if self.shuffle:
            raw = shuffled(raw, self.buffer, rng)
        for item in raw:
            try:
                sample = decode_sample(item)
            except Exception as exc:  # any failure to decode stored bytes means the shard is damaged
                name = item["__shard__"]
                self._corrupt(name, CorruptShard(f"{name}: sample {item['__key__']}: {exc}"))
                continue
            self.stats.samples += 1
            if self.crop or self.flip or self.load_size:
                sample = crop_and_flip(
                    sample, self.crop, self.flip, rng, self.load_size, self.self_pair_window
                )
            yield sample


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors into a batch; `meta` stays a list of dicts; `oracle` only when every sample has one."""
    batch: dict[str, Any] = {}
    for name in ("image", "cond", "ref", "ref_cond", "oracle"):
        if all(name in s for s in samples):
            batch[name] = torch.stack([s[name] for s in samples])
    batch["meta"] = [s["meta"] for s in samples]
    return batch


class ShardLoader:
    """Iterable of batches over a split; each new iteration is a new epoch (re-shuffled)."""

    def __init__(
        self,
        stream: ShardStream,
        batch_size: int,
        num_workers: int,
        drop_last: bool,
        skipped_shards: list[str],
    ):
        self.stream, self.batch_size, self.num_workers = stream, batch_size, num_workers
        self.drop_last = drop_last
        self.skipped_shards = skipped_shards  # found before reading (missing / truncated)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.stream.epoch += 1
        loader = torch.utils.data.DataLoader(
            self.stream, batch_size=self.batch_size, num_workers=self.num_workers,
            collate_fn=collate, drop_last=self.drop_last,
        )  # fmt: skip
        return iter(loader)


def make_loader(
    root: str | os.PathLike,
    split: str,
    batch_size: int,
    *,
    shuffle: bool = True,
    resample: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    strict: bool = False,
    buffer: int = 256,
    rank: int | None = None,
    world_size: int | None = None,
    report: Callable[[str], None] = stderr_report,
    crop: int | None = None,
    flip: bool = False,
    load_size: int | None = None,
    self_pair_window: str = "shared",
) -> ShardLoader:
    """Batches {"image", "cond", "ref", "ref_cond", ["oracle"], "meta"} of ROOT/split.

    Splits shards by node (rank, world_size: default from torch.distributed or RANK/WORLD_SIZE) and by
    DataLoader worker. Missing or truncated shards are reported by name and skipped (count in
    `loader.skipped_shards`; read-time corruption is reported by the worker) or raise with strict.
    resample=False needs at least one shard per rank (else MidmsError); a DataLoader worker left
    without a shard just ends its share at once, so fewer shards than workers never hangs.
    crop / flip / load_size: the official augmentation (`crop_and_flip`): shards prepared at 286 px with
    crop=256, or shards at 256 px with load_size=286; self_pair_window: the exemplar window of a
    self pair (the target's, or one of its own).
    """
    if batch_size < 1:
        raise MidmsError(f"batch size must be at least 1, got {batch_size}")
    default_rank, default_world = node_and_worker()
    rank = default_rank if rank is None else rank
    world = default_world if world_size is None else world_size
    stats = ReadStats()
    shards = check_shards(root, split, strict=strict, report=report, stats=stats)
    if not shards:
        raise MidmsError(f"no readable shards in {Path(root) / split}; re-run `midms prepare`")
    if not resample and len(shards) < world:
        # One pass splits whole shards by rank: a rank without a shard would read nothing at all.
        raise MidmsError(
            f"{Path(root) / split} has {len(shards)} readable shard(s) for {world} processes; each "
            "process needs one: re-run `midms prepare` with a smaller --shard-size, or use fewer processes"
        )
    stream = ShardStream(
        shards,
        shuffle=shuffle,
        resample=resample,
        seed=seed,
        buffer=buffer,
        strict=strict,
        rank=rank,
        world=world,
        report=report,
        crop=crop,
        flip=flip,
        load_size=load_size,
        digests=shard_digests(root, split),
        self_pair_window=self_pair_window,
    )
    # An endless stream has no last batch; a finite pass keeps its short last batch (evaluation).
    return ShardLoader(
        stream, batch_size, num_workers, drop_last=resample, skipped_shards=stats.skipped_shards
    )
