"""A tiny dataset plugin for the data tests: every sample is a pure function of (seed, split, index).

Pixel values are exact uint8 levels and condition values exact multiples of 1/255, so a shard
round trip must return them bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from midms_cli.conditions import ConditionSpec
from midms_cli.data.plugin import BasePlugin, PluginOption, Sample, index_rng
from midms_cli.errors import MidmsError


def expected(seed: int, split: str, index: int, size: int, channels: int) -> dict[str, torch.Tensor]:
    """The tensors of sample `index`, recomputed independently of any shard."""
    rng = index_rng(seed, split, index)
    image = torch.from_numpy(rng.integers(0, 256, (3, size, size))).float() / 127.5 - 1
    ref = torch.from_numpy(rng.integers(0, 256, (3, size, size))).float() / 127.5 - 1
    cond = torch.from_numpy(rng.integers(0, 256, (channels, size, size))).float() / 255
    ref_cond = torch.from_numpy(rng.integers(0, 256, (channels, size, size))).float() / 255
    return {"image": image, "ref": ref, "cond": cond, "ref_cond": ref_cond}


class FakeDataset(BasePlugin):
    name = "fake"
    description = "random test samples"
    version = "3"
    needs_source = False
    options = (
        PluginOption("channels", int, 2, "condition channels"),
        PluginOption("count", int, 10, "samples per split"),
        PluginOption("bad", str, "", "comma-separated indices that raise a MidmsError"),
        PluginOption("mode", str, "a", "a choice", choices=("a", "b")),
    )

    def condition_spec(self, options: Mapping[str, Any]) -> ConditionSpec:
        return ConditionSpec("fake", int(options["channels"]), False)

    def count(self, source: Path | None, split: str, options: Mapping[str, Any]) -> int:
        return int(options["count"])

    def samples(self, source, split, options, seed, size, start=0, stop=None) -> Iterator[Sample]:
        stop = self.count(source, split, options) if stop is None else stop
        bad = {int(i) for i in str(options["bad"]).split(",") if i}
        for index in range(start, stop):
            if index in bad:
                raise MidmsError(f"broken source file item{index}.jpg")
            tensors = expected(seed, split, index, size, int(options["channels"]))
            yield Sample(key=f"{split}{index:05d}", meta={"index": index, "pairing": "easy"}, **tensors)


PLUGIN = FakeDataset()
