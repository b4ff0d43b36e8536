"""Streams batches of (output, source, exemplar, oracle, warp) images through the chosen metrics.

Used by `midms eval` for both model evaluation and folder-vs-folder comparison. Networks are
passed in (or loaded from the weights registry on first use), so tests can supply small ones.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from midms_cli.metrics.fid import (
    fid_from_features,
    kernel_inception_distance,
    load_statistics,
    save_statistics,
)
from midms_cli.metrics.lpips import DiversityAccumulator
from midms_cli.metrics.oracle import OracleAccumulator, PartColourAccumulator
from midms_cli.metrics.style import StyleAccumulator
from midms_cli.metrics.swd import DescriptorSet, descriptor_sets, swd_from_sets

INCEPTION_SETS = ("output", "source", "exemplar")
# SWD reference sets and the result keys they give: against the sources (the ground truth photos) and,
# on synthetic data, against the oracles (the right answers).
SWD_REFERENCES = {"source": "swd", "oracle": "swd_oracle"}


@dataclass
class CachedSet:
    """Where the Inception features of a fixed reference set are cached, and under which key."""

    path: Path
    key: str


def to_uint8_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> float values on the 8-bit grid [0, 255] (what PGGAN's SWD reads)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round()


@dataclass
class MetricSuite:
    """Accumulates every selected metric; `result()` returns one flat dict of numbers."""

    metrics: list[str]
    resolution: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    part_names: tuple[str, ...] = ()
    networks: dict[str, torch.nn.Module] = field(default_factory=dict)
    cache: dict[str, CachedSet] = field(default_factory=dict)
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    # Another suite over the same pairs whose source / exemplar features this one reuses (baselines).
    references_from: MetricSuite | None = None
    # Names of the label ids of "output_labels" (per-region colour error; empty: not computed).
    label_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.features: dict[str, list[torch.Tensor]] = {name: [] for name in INCEPTION_SETS}
        self.cached: dict[str, dict[str, torch.Tensor]] = {}
        if {"fid", "kid"} & set(self.metrics):
            for name, entry in self.cache.items():
                loaded = load_statistics(entry.path, entry.key)
                if loaded is not None:
                    self.cached[name] = loaded
        self.swd_sets = self._swd_sets() if "swd" in self.metrics else {}
        self.oracle = {kind: OracleAccumulator(self.part_names) for kind in ("output", "warp")}
        self.part_colour = PartColourAccumulator(self.label_names)
        self.diversity = DiversityAccumulator()
        self.style: StyleAccumulator | None = None

    def _swd_sets(self) -> dict[str, DescriptorSet]:
        """The output's descriptor set and one per reference; the references share their positions,
        which are drawn independently of the output's (PGGAN)."""
        real, fake = descriptor_sets(self.resolution, self.seed)
        return {
            "output": fake,
            **{name: DescriptorSet(self.resolution, real.seed) for name in SWD_REFERENCES},
        }

    # Networks, loaded from the registry on first use unless given.

    def network(self, name: str) -> torch.nn.Module:
        if name not in self.networks:
            if name == "inception":
                from midms_cli.models.inception import load_inception_from_registry

                self.networks[name] = load_inception_from_registry()
            elif name == "lpips":
                from midms_cli.metrics.lpips import load_lpips

                self.networks[name] = load_lpips("alex")
            elif name == "vgg":
                from midms_cli.models.vgg import load_vgg19

                self.networks[name] = load_vgg19()
            else:
                raise KeyError(name)
        return self.networks[name].to(self.device).eval()

    # Accumulation.

    @torch.no_grad()
    def _add_inception(self, name: str, images: torch.Tensor | None) -> None:
        if images is None or name in self.cached or (self.references_from is not None and name != "output"):
            return
        inception = self.network("inception")
        unit = (images.to(self.device).float().clamp(-1, 1) + 1) / 2  # pytorch-fid reads images in [0, 1]
        self.features[name].append(inception(unit).double().cpu())

    @torch.no_grad()
    def add(self, batch: dict[str, Any]) -> None:
        """One batch: "output" (B, 3, H, W) in [-1, 1] and, when known, "source", "exemplar",
        "oracle", "warp" (same shape), "output_masks" / "exemplar_masks" (B, P, H, W) bool and
        "output_labels" (B, H, W), the label map of the oracle's geometry.
        A batch may also carry only a reference set ("source"), e.g. the real folder."""
        output = batch.get("output")
        if {"fid", "kid"} & set(self.metrics):
            for name in INCEPTION_SETS:
                self._add_inception(name, batch.get(name))
        if "swd" in self.metrics:
            for name in self.swd_sets:
                if batch.get(name) is not None:
                    self.swd_sets[name].add(to_uint8_range(batch[name]))
        if output is None:
            return
        if "style" in self.metrics and batch.get("exemplar") is not None:
            if self.style is None:
                self.style = StyleAccumulator(self.network("vgg"))
            moved = {
                key: None if batch.get(key) is None else batch[key].to(self.device)
                for key in ("exemplar", "source", "output_masks", "exemplar_masks")
            }
            self.style.add(
                output.to(self.device),
                moved["exemplar"],
                moved["source"],
                moved["output_masks"],
                moved["exemplar_masks"],
            )
        if "oracle" in self.metrics and batch.get("oracle") is not None:
            masks = batch.get("output_masks") if self.part_names else None
            self.oracle["output"].add(output, batch["oracle"], masks)
            if batch.get("warp") is not None:
                self.oracle["warp"].add(batch["warp"], batch["oracle"], masks)
            if self.label_names and batch.get("output_labels") is not None:
                self.part_colour.add(output, batch["oracle"], batch["output_labels"])

    def add_diversity(self, keys: list[Hashable], outputs: torch.Tensor) -> None:
        """Outputs for conditions `keys` (one per output); outputs sharing a key are compared."""
        if "lpips" in self.metrics:
            self.diversity.add(keys, outputs)

    # Results.

    def _features(self, name: str) -> torch.Tensor | None:
        if self.references_from is not None and name != "output":
            return self.references_from._features(name)
        if name in self.cached:
            return self.cached[name]["features"].double()
        return torch.cat(self.features[name]) if self.features[name] else None

    def save_cache(self) -> None:
        """Write the features of the reference sets that were computed (not loaded) this run."""
        for name, entry in self.cache.items():
            if name not in self.cached and self.features.get(name):
                save_statistics(entry.path, entry.key, torch.cat(self.features[name]))

    def _inception_results(self) -> dict[str, float]:
        result: dict[str, float] = {}
        output = self._features("output")
        if output is None:
            return result
        for reference, suffix in (("source", ""), ("exemplar", "_exemplars")):
            features = self._features(reference)
            if features is None:
                continue
            if "fid" in self.metrics:
                result[f"fid{suffix}"] = fid_from_features(output, features)
            if "kid" in self.metrics:
                mean, std = kernel_inception_distance(
                    output, features, self.kid_subsets, self.kid_subset_size, self.seed
                )
                result[f"kid{suffix}"], result[f"kid{suffix}_std"] = mean, std
        return result

    def result(self) -> dict[str, Any]:
        result: dict[str, Any] = {}
        if {"fid", "kid"} & set(self.metrics):
            result.update(self._inception_results())
            self.save_cache()
        if "swd" in self.metrics:
            for reference, key in SWD_REFERENCES.items():
                if self.swd_sets[reference].count:
                    values = swd_from_sets(self.swd_sets[reference], self.swd_sets["output"], self.seed)
                    result.update({name.replace("swd", key, 1): value for name, value in values.items()})
        if "lpips" in self.metrics:
            value, conditions = self.diversity.result(self.network("lpips"))
            if value is not None:
                result["lpips_diversity"] = value
                result["lpips_conditions"] = conditions
        if "style" in self.metrics and self.style is not None:
            result.update(self.style.result())
        if "oracle" in self.metrics:
            result.update(self.oracle["output"].result("oracle_output"))
            result.update(self.oracle["warp"].result("oracle_warp"))
            result.update(self.part_colour.result())
        return result
