"""`prepare`: turn a dataset plugin's samples into WebDataset shards.

Resumable and deterministic: shard i holds samples i*S .. (i+1)*S-1, each sample depends only on
(seed, split, index), every shard is written under a temporary name and renamed when whole, and a
restarted run keeps the shards that exist and writes only the missing ones. `prepare.json` in each
split folder records the plan so that a restart with different settings is refused, not mixed.
Temporary files of a killed run are removed when the next one starts; a run that fails before its
first shard is finished (a bad input, a full disk) removes what it wrote.
"""

from __future__ import annotations

import datetime
import json
import math
import multiprocessing
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import midms_cli
from midms_cli.atomic import check_output_dir, remove_stale_temporaries, undo_on_failure, write_text
from midms_cli.checkpoint import recorded_command
from midms_cli.data.plugin import SPLITS, Sample, resolve_options
from midms_cli.data.shards import (
    CONDITION_EXT,
    SHARD_FORMAT_VERSION,
    ShardInfo,
    shard_name,
    write_index,
    write_shard,
)
from midms_cli.errors import MidmsError
from midms_cli.weights import sha256_file

PLAN_NAME = "prepare.json"

Progress = Callable[[str, int, int], None]  # (split, samples just finished, split total)


@dataclass
class PrepareConfig:
    """Everything one `midms prepare` run needs; `options` are the plugin's own (unresolved) options."""

    dataset: str  # the entry-point name the plugin is installed under (recorded in index.json)
    out: Path
    source: Path | None = None
    size: int = 256
    splits: tuple[str, ...] = SPLITS
    limit: int | None = None
    shard_size: int = 256
    workers: int = 1
    seed: int = 0
    strict: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    command: str = ""


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return {key: (str(value) if isinstance(value, Path) else value) for key, value in options.items()}


# Validation.


def validate(config: PrepareConfig, plugin: Any) -> None:
    if config.size < 8:
        raise MidmsError(f"--size must be at least 8 pixels, got {config.size}")
    if config.shard_size < 1:
        raise MidmsError(f"--shard-size must be at least 1, got {config.shard_size}")
    if config.workers < 1:
        raise MidmsError(f"--workers must be at least 1, got {config.workers}")
    if config.limit is not None and config.limit < 0:
        raise MidmsError(f"--limit must be >= 0, got {config.limit}")
    unknown = [s for s in config.splits if s not in SPLITS]
    if unknown:
        raise MidmsError(f"unknown split {unknown[0]!r}; use train, val or all")
    if plugin.needs_source:
        if config.source is None:
            raise MidmsError(f"dataset {plugin.name!r} reads a folder: give --source DIR")
        if not Path(config.source).is_dir():
            raise MidmsError(f"--source {config.source} is not a folder")
    check_output_dir(config.out)
    for split in config.splits:
        check_output_dir(Path(config.out) / split, "--out")


def validate_options(plugin: Any, options: dict[str, Any]) -> None:
    """Plugin option values no dataset can use: NaN or infinite numbers, negative counts."""
    for option in getattr(plugin, "options", ()):
        value = options.get(option.name)
        if option.type in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise MidmsError(f"{option.flag} must be a finite number, got {value}")
            if option.name.endswith("count") and value < 0:
                raise MidmsError(f"{option.flag} must be >= 0, got {value}")


# One shard.


def _shard_samples(
    plugin: Any,
    config: PrepareConfig,
    options: dict[str, Any],
    split: str,
    start: int,
    stop: int,
    skipped: list[str],
) -> Iterator[Sample]:
    """Samples start..stop-1, one plugin call each so a bad item can be skipped without losing the rest."""
    for index in range(start, stop):
        try:
            yield from plugin.samples(
                config.source, split, options, config.seed, config.size, index, index + 1
            )
        except MidmsError as exc:
            if config.strict:
                raise
            skipped.append(f"{split} sample {index}: {exc}")


def make_shard(
    plugin: Any, config: PrepareConfig, options: dict[str, Any], split: str, shard: int, total: int
) -> tuple[ShardInfo, list[str]]:
    """Write shard `shard` of `split`; returns its info and the reasons of any skipped samples."""
    start = shard * config.shard_size
    stop = min(start + config.shard_size, total)
    skipped: list[str] = []
    samples = _shard_samples(plugin, config, options, split, start, stop, skipped)
    info = write_shard(config.out / split / shard_name(shard), samples)
    return info, skipped


def _worker_make_shard(args: tuple) -> tuple[ShardInfo, list[str]]:
    torch.set_num_threads(1)  # one shard per process; intra-op threads would only oversubscribe
    return make_shard(*args)


def existing_shard_info(path: Path) -> ShardInfo:
    """Info of a shard a previous run finished: its sample count is its number of .json members."""
    with tarfile.open(path, mode="r|") as archive:
        count = sum(1 for member in archive if member.name.endswith(".json"))
    return ShardInfo(path.name, count, sha256_file(path), path.stat().st_size)


# One split.


def _plan(plugin: Any, config: PrepareConfig, options: dict[str, Any], split: str, total: int) -> dict:
    """What decides a split's shards; recorded in prepare.json and repeated in index.json."""
    return {
        "plugin": config.dataset or plugin.name,
        "plugin_version": str(plugin.version),
        "options": _jsonable(options),
        "seed": config.seed,
        "split": split,
        "image_size": config.size,
        "shard_size": config.shard_size,
        "count": total,
        "source": str(Path(config.source).resolve()) if config.source is not None else None,
    }


def _check_plan(directory: Path, plan: dict) -> None:
    """Refuse to mix shards of two different preparations in one folder."""
    path = directory / PLAN_NAME
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous != plan:
            differing = sorted(
                k for k in plan if not isinstance(previous, dict) or previous.get(k) != plan[k]
            )
            raise MidmsError(
                f"{directory} holds shards of a different preparation (differs in {', '.join(differing)}); "
                f"use another --out or delete {directory}"
            )
    write_text(path, json.dumps(plan, indent=2, sort_keys=True) + "\n")


def _remove_stale_temporaries(directory: Path) -> None:
    """A killed run can leave temporary shards, prepare.json and index.json files behind; they
    never count (only whole files under their own names do)."""
    remove_stale_temporaries(directory)
    remove_stale_temporaries(directory.parent)


def prepare_split(
    plugin: Any,
    config: PrepareConfig,
    options: dict[str, Any],
    split: str,
    progress: Progress | None = None,
    report: Callable[[str], None] | None = None,
) -> dict:
    """Write every missing shard of `split`, then its index.json; returns the index."""
    # Plan the split.
    total = plugin.count(config.source, split, options)
    if not isinstance(total, int) or total < 0:
        raise MidmsError(f"dataset {plugin.name!r} reports {total!r} {split} samples; check its options")
    if config.limit is not None:
        total = min(total, config.limit)
    directory = config.out / split
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(directory)
    plan = _plan(plugin, config, options, split, total)
    _check_plan(directory, plan)
    shard_count = (total + config.shard_size - 1) // config.shard_size

    # Keep the shards a previous run finished.
    infos: dict[int, ShardInfo] = {}
    for shard in range(shard_count):
        path = directory / shard_name(shard)
        if path.is_file():
            infos[shard] = existing_shard_info(path)
            if progress:
                progress(split, min(config.shard_size, total - shard * config.shard_size), total)
    todo = [shard for shard in range(shard_count) if shard not in infos]

    # Write the missing ones, in this process or in a pool of workers.
    skipped: list[str] = []
    jobs = [(plugin, config, options, split, shard, total) for shard in todo]
    if config.workers == 1 or len(jobs) <= 1:
        results = (make_shard(*job) for job in jobs)
    else:
        pool = multiprocessing.get_context("spawn").Pool(min(config.workers, len(jobs)))
        results = pool.imap(_worker_make_shard, jobs)
    written = sum(info.count for info in infos.values())
    reported = 0  # how many of `skipped` were reported
    try:
        for shard, (info, reasons) in zip(todo, results, strict=True):
            infos[shard] = info
            written += info.count
            # Warnings wait for the first written sample: when every sample is skipped, the one
            # error line below says so, with the first reason, instead of a warning per sample.
            skipped += reasons
            if written and report:
                for reason in skipped[reported:]:
                    report(f"warning: skipped {reason}")
                reported = len(skipped)
            if progress:
                progress(split, min(config.shard_size, total - shard * config.shard_size), total)
    finally:
        if config.workers > 1 and len(jobs) > 1:
            pool.terminate()

    # Index the split.
    shards = [infos[shard].to_dict() for shard in range(shard_count)]
    count = sum(entry["count"] for entry in shards)
    if total > 0 and count == 0:
        raise MidmsError(f"every {split} sample was skipped; first problem: {skipped[0] if skipped else '?'}")
    spec = plugin.condition_spec(options)
    index = {
        **plan,
        "format_version": SHARD_FORMAT_VERSION,
        "condition": {
            "kind": spec.kind,
            "channels": spec.channels,
            "encoding": f"{CONDITION_EXT} uint8 / 255",
        },
        "count": count,
        "skipped": total - count,  # bad source items skipped (without --strict), this run or an earlier one
        "shards": shards,
        "command": config.command or " ".join(recorded_command()),
        "midms_version": midms_cli.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    write_index(directory, index)
    return index


def prepare(
    config: PrepareConfig,
    plugin: Any,
    progress: Progress | None = None,
    report: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Prepare every requested split; returns {split: {count, shards, skipped}} and the output folder."""
    validate(config, plugin)
    options = resolve_options(plugin, config.options)
    validate_options(plugin, options)
    result: dict[str, Any] = {"dataset": config.dataset or plugin.name, "out": str(config.out), "splits": {}}
    with undo_on_failure(config.out, _finished_shard):
        for split in config.splits:
            index = prepare_split(plugin, config, options, split, progress, report)
            result["splits"][split] = {
                "count": index["count"], "shards": len(index["shards"]), "skipped": index["skipped"],
            }  # fmt: skip
    return result


def _finished_shard(path: Path) -> bool:
    """What a failed run keeps: finished shards holding samples, which a re-run reuses."""
    if not (path.name.startswith("shard-") and path.suffix == ".tar"):
        return False
    try:
        return existing_shard_info(path).count > 0
    except (OSError, tarfile.TarError):
        return False
