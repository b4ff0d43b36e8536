"""WebDataset shards: the on-disk format of prepared datasets, its writer and its readers.

Layout (shard format version 2): `ROOT/{split}/shard-000000.tar ...` plus
`ROOT/{split}/index.json`. One sample is the group of tar members sharing a key (no dots):

    KEY.image.png        ground truth, RGB uint8
    KEY.cond.npy.gz      condition, (C, H, W) uint8 array, gzip-compressed .npy (no pickle)
    KEY.ref.png          exemplar, RGB uint8
    KEY.ref_cond.npy.gz  exemplar condition, as cond
    KEY.oracle.png       optional: the right answer for (cond, ref) (synthetic data only)
    KEY.json             meta: ids, pairing (easy/hard/self), source paths; synthetic data also
                         the exemplar's appearance kind (same/similar/independent) and parameters

Conditions are stored as round(255 * c): the official recipes quantise every channel to uint8
(edges and one-hot maps are 0/1, distance maps and the pose picture are k/255), so this is lossless,
and gzip shrinks the mostly-constant channels (one-hot, saturated distance maps) many times over.
Tar headers carry a fixed owner and mtime, and gzip a zero mtime, so a shard's bytes depend only on
its samples: a resumed or re-run preparation reproduces the same sha256. Readers check that sha256
(recorded in index.json) on every pass, before any sample of the shard is used.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import sys
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from midms_cli.atomic import atomic_path, write_text
from midms_cli.data.plugin import Sample, check_key
from midms_cli.errors import MidmsError
from midms_cli.weights import sha256_file

# 2: synthetic exemplars have an appearance of their own, recorded in KEY.json, so the oracle is no
# longer the source photo. Version-1 shards are still read.
SHARD_FORMAT_VERSION = 2
INDEX_NAME = "index.json"
IMAGE_FIELDS = ("image", "ref", "oracle")
CONDITION_FIELDS = ("cond", "ref_cond")
CONDITION_EXT = "npy.gz"
REQUIRED_FIELDS = ("image.png", f"cond.{CONDITION_EXT}", "ref.png", f"ref_cond.{CONDITION_EXT}", "json")


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


# Encoding: tensors <-> bytes of one tar member.


def encode_image(image: torch.Tensor) -> bytes:
    """(3, H, W) in [-1, 1] -> PNG bytes (uint8, round to nearest)."""
    pixels = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).numpy(), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def decode_image(data: bytes) -> torch.Tensor:
    """PNG bytes -> (3, H, W) float in [-1, 1]."""
    with Image.open(io.BytesIO(data)) as handle:
        pixels = np.asarray(handle.convert("RGB"))
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def encode_condition(cond: torch.Tensor) -> bytes:
    """(C, H, W) in [0, 1] -> gzip-compressed .npy of round(255 * c) as uint8 (lossless for k/255 values)."""
    levels = (cond.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(levels), allow_pickle=False)
    return gzip.compress(buffer.getvalue(), compresslevel=6, mtime=0)


def decode_condition(data: bytes) -> torch.Tensor:
    """Bytes written by `encode_condition` -> (C, H, W) float in [0, 1]."""
    array = np.lib.format.read_array(io.BytesIO(gzip.decompress(data)), allow_pickle=False)
    if array.dtype != np.uint8 or array.ndim != 3:
        raise ValueError(f"condition array must be uint8 (C, H, W), got {array.dtype} {array.shape}")
    return torch.from_numpy(array.copy()).float() / 255.0


def encode_sample(sample: Sample) -> dict[str, Any]:
    """A `Sample` -> the member dict `webdataset.TarWriter.write` takes (bytes only)."""
    record: dict[str, Any] = {"__key__": check_key(sample.key)}
    record["image.png"] = encode_image(sample.image)
    record["ref.png"] = encode_image(sample.ref)
    if sample.oracle is not None:
        record["oracle.png"] = encode_image(sample.oracle)
    record[f"cond.{CONDITION_EXT}"] = encode_condition(sample.cond)
    record[f"ref_cond.{CONDITION_EXT}"] = encode_condition(sample.ref_cond)
    record["json"] = json.dumps(sample.meta, sort_keys=True).encode("utf-8")
    return record


def decode_sample(raw: dict[str, bytes]) -> dict[str, Any]:
    """The members of one sample -> {"image", "cond", "ref", "ref_cond", ["oracle"], "meta"}."""
    missing = [name for name in REQUIRED_FIELDS if name not in raw]
    if missing:
        raise ValueError(f"sample {raw.get('__key__')!r} lacks {', '.join(missing)}")
    sample: dict[str, Any] = {}
    for name in IMAGE_FIELDS:
        if f"{name}.png" in raw:
            sample[name] = decode_image(raw[f"{name}.png"])
    for name in CONDITION_FIELDS:
        sample[name] = decode_condition(raw[f"{name}.{CONDITION_EXT}"])
    meta = json.loads(raw["json"].decode("utf-8"))
    meta["key"] = raw["__key__"]
    sample["meta"] = meta
    return sample


# Writing.


@dataclass(frozen=True)
class ShardInfo:
    """What index.json records about one finished shard."""

    name: str
    count: int
    sha256: str
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "count": self.count, "sha256": self.sha256, "bytes": self.bytes}


def write_shard(path: str | os.PathLike, samples: Iterable[Sample]) -> ShardInfo:
    """Write `samples` to one tar under a temporary name, then rename: a shard is whole or absent."""
    path = Path(path)
    count = 0
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as stream:
            # Fixed owner, mode and mtime make the bytes reproducible (TarWriter's `mtime` argument).
            writer = wds.TarWriter(stream, encoder=False, user="midms", group="midms", mode=0o444, mtime=0.0)
            try:
                for sample in samples:
                    writer.write(encode_sample(sample))
                    count += 1
            finally:  # also on failure, so the tar stream never writes into a closed file later
                writer.close()
    return ShardInfo(path.name, count, sha256_file(path), path.stat().st_size)


def write_index(directory: str | os.PathLike, index: dict[str, Any]) -> None:
    write_text(Path(directory) / INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")


# Reading.


def read_index(root: str | os.PathLike, split: str) -> dict[str, Any]:
    """The index of ROOT/split: plugin, condition {kind, channels}, image_size, count, shards."""
    path = Path(root) / split / INDEX_NAME
    if not path.is_file():
        raise MidmsError(f"no shard index at {path}: run `midms prepare NAME --out {root}` first")
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MidmsError(f"shard index {path} is not valid JSON ({exc}); re-run `midms prepare`") from exc
    version = index.get("format_version") if isinstance(index, dict) else None
    if not isinstance(version, int) or not isinstance(index.get("shards"), list):
        raise MidmsError(f"{path} is not a midms shard index (no format_version/shards)")
    if version > SHARD_FORMAT_VERSION:
        raise MidmsError(
            f"{path} has shard format version {version}; this midms reads up to "
            f"{SHARD_FORMAT_VERSION}: upgrade midms"
        )
    return index


class CorruptShard(Exception):
    """A shard that cannot be read; carries the shard name."""


def _verified_bytes(path: Path, sha256: str) -> io.BytesIO:
    """The whole shard, read once and hashed on the way: a same-size bit flip is caught before any
    of its samples is decoded. A shard is a few MB to a few hundred MB, one per reader at a time."""
    digest = hashlib.sha256()
    buffer = io.BytesIO()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
            buffer.write(block)
    if digest.hexdigest() != sha256:
        raise CorruptShard(f"{path.name}: sha256 differs from index.json")
    buffer.seek(0)
    return buffer


def read_shard(path: str | os.PathLike, sha256: str | None = None) -> Iterator[dict[str, bytes]]:
    """The raw samples of one tar, in order: {"__key__", "<field>.<ext>": bytes}. Raises CorruptShard.

    With `sha256` (from index.json) the shard's bytes are checked first, in the same read.
    """
    path = Path(path)
    current: dict[str, bytes] | None = None
    try:
        source = {"fileobj": _verified_bytes(path, sha256)} if sha256 else {"name": path}
        with tarfile.open(mode="r|", **source) as archive:
            for member in archive:
                if not member.isreg():
                    continue
                key, _, suffix = member.name.partition(".")
                handle = archive.extractfile(member)
                data = handle.read() if handle is not None else b""
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key}
                current[suffix] = data
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise CorruptShard(f"{path.name}: {exc}") from exc
    if current is not None:
        yield current


def decoded_shard(path: Path, sha256: str | None = None) -> Iterator[dict[str, Any]]:
    """Decoded samples of one shard; any unreadable member makes the whole shard CorruptShard."""
    for raw in read_shard(path, sha256):
        try:
            yield decode_sample(raw)
        except Exception as exc:  # any failure to decode stored bytes means the shard is damaged
            raise CorruptShard(f"{path.name}: {exc}") from exc


def stderr_report(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


@dataclass
class ReadStats:
    """What a reader skipped: corrupt shard names (the count is len(skipped_shards))."""

    skipped_shards: list[str] = field(default_factory=list)
    samples: int = 0


def check_shards(
    root: str | os.PathLike,
    split: str,
    *,
    verify: bool = False,
    strict: bool = False,
    report: Callable[[str], None] = stderr_report,
    stats: ReadStats | None = None,
) -> list[Path]:
    """The readable shards of a split: missing or wrong-size ones (and with verify, wrong sha256) are
    reported by name and left out, or raise MidmsError with strict."""
    index = read_index(root, split)
    directory = Path(root) / split
    good = []
    for entry in index["shards"]:
        path = directory / entry["name"]
        problem = None
        if not path.is_file():
            problem = "missing"
        elif path.stat().st_size != entry.get("bytes", path.stat().st_size):
            problem = f"size {path.stat().st_size} != {entry['bytes']} in index.json"
        elif verify and sha256_file(path) != entry.get("sha256"):
            problem = "sha256 differs from index.json"
        if problem is None:
            good.append(path)
            continue
        if strict:
            raise MidmsError(f"corrupt shard {path} ({problem}); re-run `midms prepare` to rebuild it")
        report(f"warning: skipping corrupt shard {path} ({problem})")
        if stats is not None:
            stats.skipped_shards.append(path.name)
    if stats is not None and stats.skipped_shards:
        report(f"warning: skipped {len(stats.skipped_shards)} corrupt shard(s) in {directory}")
    return good


def shard_digests(root: str | os.PathLike, split: str) -> dict[str, str]:
    """{shard name: sha256} from the split's index.json (what readers check each shard against)."""
    return {
        str(entry["name"]): str(entry["sha256"])
        for entry in read_index(root, split)["shards"]
        if isinstance(entry, dict) and entry.get("sha256")
    }


def iterate_samples(
    root: str | os.PathLike,
    split: str,
    *,
    strict: bool = False,
    stats: ReadStats | None = None,
    report: Callable[[str], None] = stderr_report,
) -> Iterator[dict[str, Any]]:
    """Every sample of a split exactly once, in shard and write order (for evaluation).

    Each shard's sha256 is checked as it is read, before its first sample, so a corrupt shard is
    skipped whole (reported by name and counted in `stats`) or, with strict, raises MidmsError.
    """
    stats = stats if stats is not None else ReadStats()
    digests = shard_digests(root, split)
    for path in check_shards(root, split, strict=strict, report=report, stats=stats):
        try:
            for sample in decoded_shard(path, digests.get(path.name)):
                stats.samples += 1
                yield sample
        except CorruptShard as exc:
            if strict:
                raise MidmsError(f"corrupt shard {exc}; re-run `midms prepare` to rebuild it") from exc
            report(f"warning: skipping the rest of corrupt shard {exc}")
            stats.skipped_shards.append(path.name)


# The training / evaluation loader lives in `midms_cli.data.loader` (which uses this module's
# readers); its names stay importable here.
_LOADER_NAMES = ("ShardLoader", "ShardStream", "assigned_shards", "collate", "crop_and_flip", "make_loader",
                 "node_and_worker", "shuffled")


def __getattr__(name: str) -> Any:
    if name in _LOADER_NAMES:
        from midms_cli.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
