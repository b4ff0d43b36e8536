"""Exemplar pairing as the official loaders do it: easy / hard / self references and the
retrieval lists behind them.

Training draws u ~ U(0, 1): u < hard -> "hard" reference, u < hard + easy -> "easy", else "self"
(official probabilities hard 0.2, easy 0.5, self 0.3). Easy and hard references come from CoCosNet
retrieval lists (`key.jpg,cand1,cand2,...`); for a dataset without one, `build_reference_list`
ranks candidates by cosine similarity of a small appearance feature (see `appearance_feature`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from midms_cli.errors import MidmsError


@dataclass(frozen=True)
class PairingProbabilities:
    """Probabilities of the three reference kinds; official `train.py`: hard 0.2, easy 0.5, self 0.3."""

    hard: float = 0.2
    easy: float = 0.5
    self: float = 0.3

    def __post_init__(self) -> None:
        values = (self.hard, self.easy, self.self)
        if any(p < 0 for p in values) or abs(sum(values) - 1.0) > 1e-6:
            raise MidmsError(f"pairing probabilities must be >= 0 and sum to 1, got hard/easy/self {values}")


OFFICIAL_PAIRING = PairingProbabilities()
EVAL_PAIRING = PairingProbabilities(hard=0.0, easy=1.0, self=0.0)  # official test lists: the first candidate


def choose_pairing(u: float, probabilities: PairingProbabilities = OFFICIAL_PAIRING) -> str:
    """Map one uniform draw u in [0, 1) to "hard", "easy" or "self"."""
    if u < probabilities.hard:
        return "hard"
    if u < probabilities.hard + probabilities.easy:
        return "easy"
    return "self"


def read_reference_list(path: str | os.PathLike) -> dict[str, list[str]]:
    """A CoCosNet retrieval list: one line per key, `key.jpg,cand1.jpg,cand2.jpg,...`.

    Separators may be commas and/or spaces. Returns key -> candidates in file order (most similar
    first). A line without a candidate is a user error naming the file and line.
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise MidmsError(f"cannot read reference list {path}: {exc}") from exc
    references: dict[str, list[str]] = {}
    for number, line in enumerate(lines, start=1):
        names = [name for name in line.replace(",", " ").split() if name]
        if not names:
            continue
        if len(names) < 2:
            raise MidmsError(
                f"{path}:{number}: expected `key,candidate[,candidate...]`, got {line.strip()!r}"
            )
        references[names[0]] = names[1:]
    if not references:
        raise MidmsError(f"reference list {path} has no entries")
    return references


def pick_reference(
    key: str,
    pairing: str,
    candidates: Sequence[str],
    pool: Sequence[str],
    rng: np.random.Generator,
    *,
    easy: str = "first",
    hard: str = "last",
) -> str:
    """The exemplar of `key` for a pairing kind.

    easy: "first" (CelebA, LSUN) or "last" (DeepFashion) candidate; hard: the "last" candidate
    (CelebA, LSUN) or a "random" image of `pool` (DeepFashion); self: the key itself.
    """
    if pairing == "self":
        return key
    if pairing == "hard" and hard == "random":
        return pool[int(rng.integers(len(pool)))]
    if not candidates:
        raise MidmsError(f"no reference candidates for {key!r}; give a reference list that covers it")
    if pairing == "easy":
        return candidates[0] if easy == "first" else candidates[-1]
    if pairing == "hard":
        return candidates[-1]
    raise ValueError(f"unknown pairing {pairing!r}")


def appearance_feature(image: torch.Tensor, thumbnail: int = 8, bins: int = 8) -> torch.Tensor:
    """A small appearance descriptor for retrieval when no list exists.

    image (3, H, W) in [-1, 1] -> (3 * thumbnail**2 + 3 * bins,): a mean-removed, L2-normalised
    thumbnail (layout and colour) concatenated with an L2-normalised per-channel colour histogram
    (colour regardless of layout). Each half has unit norm, so both weigh equally in the cosine.
    """
    small = F.adaptive_avg_pool2d(image.float().unsqueeze(0), thumbnail).flatten()
    small = F.normalize(small - small.mean(), dim=0)
    levels = ((image.float().clamp(-1, 1) + 1) / 2 * bins).long().clamp(max=bins - 1)  # (3, H, W)
    histogram = torch.stack([torch.bincount(levels[c].flatten(), minlength=bins) for c in range(3)]).flatten()
    histogram = F.normalize(histogram.float(), dim=0)
    return torch.cat([small, histogram])


def build_reference_list(
    keys: Sequence[str], features: torch.Tensor, top_k: int = 20, chunk: int = 1024
) -> dict[str, list[str]]:
    """For each key, the `top_k` other keys by cosine similarity of `features` (N, D), best first.

    The same shape as a CoCosNet list, so "easy" = first entry and "hard" = last entry keep their
    meaning. Computed in row chunks so memory is O(chunk * N), not O(N^2).
    """
    if len(keys) != features.shape[0]:
        raise ValueError("one feature row per key")
    if len(keys) < 2:
        raise MidmsError("building a reference list needs at least two images")
    k = min(top_k, len(keys) - 1)
    unit = F.normalize(features.float(), dim=1)
    references: dict[str, list[str]] = {}
    for start in range(0, len(keys), chunk):
        similarity = unit[start : start + chunk] @ unit.T  # (chunk, N)
        rows = torch.arange(similarity.shape[0])
        similarity[rows, rows + start] = -float("inf")  # never one's own reference
        # Stable order for ties: sort by (similarity desc, index asc).
        order = torch.sort(similarity, dim=1, descending=True, stable=True).indices[:, :k]
        for row, best in enumerate(order.tolist()):
            references[keys[start + row]] = [keys[j] for j in best]
    return references
