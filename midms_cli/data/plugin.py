"""The dataset plugin protocol: what an object registered under `midms.datasets` provides.

A plugin turns one raw dataset (or a generator, for synthetic data) into `Sample` records; the
prepare pipeline writes them to WebDataset shards. Sample `i` of a split
must depend only on (source, split, options, seed, i): the pipeline asks for index ranges in any
order and from several worker processes, and a resumed run asks only for the shards still missing.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from midms_cli.conditions import ConditionSpec
from midms_cli.errors import MidmsError

SPLITS = ("train", "val")
PAIRINGS = ("easy", "hard", "self")  # the official loaders' exemplar kinds


@dataclass(frozen=True)
class PluginOption:
    """One typed plugin option; `midms prepare NAME --help` shows it as `--name` (underscores -> dashes)."""

    name: str
    type: type  # str, int, float, bool or Path
    default: Any
    help: str
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass
class Sample:
    """One training example, everything a shard sample holds.

    image, ref: (3, H, W) float in [-1, 1]; cond, ref_cond: (C, H, W) float in [0, 1] whose values
    are multiples of 1/255 (the official recipes quantise to uint8), so shards store them losslessly.
    oracle: (3, H, W) in [-1, 1], the right answer for (cond, ref) when the plugin knows it.
    meta: JSON-ready dict with at least ids, `pairing` (easy/hard/self) and source paths.
    key: unique within the split, no dots (WebDataset splits file names at the first dot).
    """

    key: str
    image: torch.Tensor
    cond: torch.Tensor
    ref: torch.Tensor
    ref_cond: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    oracle: torch.Tensor | None = None


@runtime_checkable
class DatasetPlugin(Protocol):
    """What `midms prepare` needs from a plugin. Subclass `BasePlugin` or provide the same members."""

    name: str  # the entry-point name, e.g. "celebahq"
    description: str  # one line for `midms datasets`
    version: str  # bump when the samples a plugin produces change
    needs_source: bool  # False for generated data (`--source` then not required)
    options: tuple[PluginOption, ...]

    def condition_spec(self, options: Mapping[str, Any]) -> ConditionSpec:
        """The condition this plugin produces with these options (variants may change it)."""

    def count(self, source: Path | None, split: str, options: Mapping[str, Any]) -> int:
        """How many samples `split` has; cheap (lists files, reads split lists)."""

    def samples(
        self,
        source: Path | None,
        split: str,
        options: Mapping[str, Any],
        seed: int,
        size: int,
        start: int = 0,
        stop: int | None = None,
    ) -> Iterator[Sample]:
        """Samples `start .. stop-1` of `split` in index order, images `size` x `size`.

        A missing or malformed source file raises MidmsError naming it; `midms prepare` then skips
        that sample with a warning (or stops, with --strict).
        """


class BasePlugin:
    """Convenience base: defaults for the simple members and option handling."""

    name = ""
    description = ""
    version = "1"
    needs_source = True
    options: tuple[PluginOption, ...] = ()

    def default_options(self) -> dict[str, Any]:
        return default_options(self)


def default_options(plugin: Any) -> dict[str, Any]:
    """Every declared option at its default value."""
    return {opt.name: opt.default for opt in getattr(plugin, "options", ())}


def _convert(option: PluginOption, value: Any) -> Any:
    if option.type is bool and isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got {value!r}")
    if option.type is Path:
        return None if value in (None, "") else Path(value).expanduser()
    return value if value is None else option.type(value)


def resolve_options(plugin: Any, given: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults overridden by `given`, converted to each option's type and checked against choices."""
    declared = {opt.name: opt for opt in getattr(plugin, "options", ())}
    unknown = sorted(set(given) - set(declared))
    if unknown:
        names = ", ".join(opt.flag for opt in declared.values()) or "none"
        raise MidmsError(f"dataset {plugin.name!r} has no option {unknown[0]!r}; its options: {names}")
    resolved = default_options(plugin)
    for key, value in given.items():
        option = declared[key]
        try:
            resolved[key] = _convert(option, value)
        except (TypeError, ValueError) as exc:
            raise MidmsError(f"{option.flag} for dataset {plugin.name!r}: {exc}") from exc
        if option.choices is not None and resolved[key] not in option.choices:
            raise MidmsError(f"{option.flag} must be one of {', '.join(option.choices)}, got {value!r}")
    return resolved


def index_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random generator of sample `index`: depends only on (seed, split, index), never on workers."""
    return np.random.default_rng([seed, SPLITS.index(split) if split in SPLITS else 99, index])


def check_key(key: str) -> str:
    """Keys name the files of one sample in a tar; a dot would split the name in the wrong place."""
    if not key or "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must be non-empty and contain no '.' or '/'")
    return key
