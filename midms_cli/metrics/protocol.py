"""The evaluation protocol record: what makes an evaluation reproducible.

`protocol.json` holds the protocol version, the pair list and its hash, the image size, the
model file's hash, the hashes of every metric network used, sampler options and seeds, and the
package version; `results.json` holds the numbers. Both are written with sorted keys, so the same
inputs give byte-identical files (no timestamps).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import midms_cli
from midms_cli.atomic import write_text
from midms_cli.errors import MidmsError

# 2: SWD draws the positions of each set and the directions independently (PGGAN); every model
# evaluation scores named methods (the model, its ablations, the copy / source / ceiling baselines) over
# one or more noise seeds; results.json holds "methods", "sd" and "per_seed"; the part colour error and
# SWD against the oracles join the oracle metrics.
PROTOCOL_VERSION = 2


@dataclass(frozen=True)
class Pair:
    """One translation to evaluate: the condition of sample `condition` with the exemplar (ref and
    ref_cond) stored with sample `exemplar`. Equal keys are the dataset's own pair (with its oracle);
    other pairs serve the diversity metric."""

    condition: str
    exemplar: str

    @property
    def primary(self) -> bool:
        return self.condition == self.exemplar


def default_pairs(keys: Sequence[str], diversity_exemplars: int = 0, limit: int | None = None) -> list[Pair]:
    """For each of the first `limit` samples (all by default) its own pair, then (for diversity) the
    exemplars of the next `diversity_exemplars` samples of the split, cyclically. Grouping by
    condition keeps the samples a reader must hold at once to a small window."""
    conditions = keys[:limit] if limit is not None else keys
    extra = min(diversity_exemplars, len(keys) - 1)
    return [
        Pair(key, keys[(i + offset) % len(keys)])
        for i, key in enumerate(conditions)
        for offset in range(extra + 1)
    ]


def format_pairs(pairs: Iterable[Pair]) -> str:
    """The pair list file: one `CONDITION_KEY EXEMPLAR_KEY` line per pair."""
    return "".join(f"{pair.condition} {pair.exemplar}\n" for pair in pairs)


def parse_pairs(text: str, source: str = "pair list") -> list[Pair]:
    """Read a pair list: `CONDITION_KEY EXEMPLAR_KEY` per line; blank lines and # comments skipped."""
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 2:
            raise MidmsError(f"{source} line {number}: expected `CONDITION_KEY EXEMPLAR_KEY`, got {line!r}")
        pairs.append(Pair(*fields))
    if not pairs:
        raise MidmsError(f"{source} holds no pairs; write one `CONDITION_KEY EXEMPLAR_KEY` per line")
    return pairs


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def weights_hashes(names: Iterable[str]) -> dict[str, str]:
    """The sha256 of the original file each registered weight was added from (or of the stored file)."""
    from midms_cli.weights import require_weight, sha256_file, weight_metadata

    hashes = {}
    for name in sorted(set(names)):
        metadata = weight_metadata(name)
        hashes[name] = metadata.get("source_sha256") or sha256_file(require_weight(name))
    return hashes


def protocol_record(**fields: Any) -> dict[str, Any]:
    """The protocol dict: the given fields plus protocol and package version."""
    return {"protocol_version": PROTOCOL_VERSION, "package_version": midms_cli.__version__, **fields}


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Sorted, indented JSON written atomically."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
