"""synthfaces: generated face-like images with exact part masks and a known oracle.

No download: every sample is rendered from its index and the seed. The condition comes from the
face's geometry; the exemplar is another face, with another geometry and (by default) an appearance
of its own: a similar-looking face for training pairs, as retrieval lists give, an unrelated one for
validation pairs. `generator.oracle` renders any geometry in any appearance: the exact answer of a
translation, stored with every sample.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from midms_cli.conditions import CONDITIONS, ConditionSpec
from midms_cli.data.plugin import SPLITS, BasePlugin, PluginOption, Sample, check_key, index_rng

from .generator import (
    APPEARANCES,
    LABELS,
    PAIRINGS,
    VARIANTS,
    appearance_of,
    exemplar_appearance,
    exemplar_geometry,
    geometry_of,
    make_pair,
    one_intra_op_thread,
    oracle,
    render,
    render_condition,
    render_labels,
    sample_appearance,
    sample_geometry,
)

__all__ = [
    "APPEARANCES", "LABELS", "PAIRINGS", "PLUGIN", "SynthFaces", "VARIANTS", "appearance_of",
    "exemplar_appearance", "exemplar_geometry",
    "geometry_of", "make_pair", "oracle", "render", "render_condition", "render_labels",
    "sample_appearance", "sample_geometry", "split_seed",
]  # fmt: skip

CHUNK = 16  # samples generated per thread-setting switch

# The official training mix of exemplars (MIDMs and CoCosNet data loaders): hard 0.2, easy 0.5, self 0.3.
# Validation pairs are never "self" (a self pair is trivial to translate): hard 0.2, easy 0.8.
MIXED_PROBABILITIES = {"train": {"hard": 0.2, "easy": 0.5, "self": 0.3}, "val": {"hard": 0.2, "easy": 0.8}}
# The exemplar's appearance under "auto": training pairs look like a real dataset's (the photo's own
# condition and a similar-looking exemplar, so training never needs the oracle); validation pairs need
# translation (the exemplar's colours are unrelated to the condition's photo).
AUTO_APPEARANCE = {"train": "similar", "val": "independent"}


def split_seed(seed: int, split: str) -> int:
    """The generator seed of a split: train and val faces never coincide."""
    return int(np.random.SeedSequence([seed, SPLITS.index(split)]).generate_state(1)[0])


class SynthFaces(BasePlugin):
    name = "synthfaces"
    description = "generated face-like images with CelebAMask-HQ-style parts and exact oracles (no download)"
    # 2: canny-variant conditions are Canny edges of the photos themselves. 3: exemplars have an
    # appearance of their own (similar for train, independent for val) and a larger "easy" nudge.
    version = "3"
    needs_source = False
    options = (
        PluginOption("variant", str, "official", "condition: official 15-channel CelebA-HQ recipe or canny",
                     choices=tuple(VARIANTS)),
        PluginOption("pairing", str, "mixed",
                     "exemplar pairing: mixed (the official training mix), easy, hard or self",
                     choices=("mixed", *PAIRINGS)),
        PluginOption("exemplar_appearance", str, "auto",
                     "exemplar colours: auto (similar for train, independent for val), same, similar or "
                     "independent", choices=("auto", *APPEARANCES)),
        PluginOption("train_count", int, 20000, "number of generated training samples"),
        PluginOption("val_count", int, 500, "number of generated validation samples"),
    )  # fmt: skip

    def condition_spec(self, options: Mapping[str, Any]) -> ConditionSpec:
        variant = options.get("variant", "official")
        return CONDITIONS["celebahq-edges" if variant == "official" else "canny"]

    def count(self, source: Path | None, split: str, options: Mapping[str, Any]) -> int:
        return int(options.get(f"{split}_count", 20000 if split == "train" else 500))

    def pairing_of(self, split: str, options: Mapping[str, Any], seed: int, index: int) -> str:
        """The pairing kind of sample `index`: fixed by the option, or drawn from the spec's mix."""
        pairing = options.get("pairing", "mixed")
        if pairing != "mixed":
            return pairing
        kinds, weights = zip(*MIXED_PROBABILITIES.get(split, MIXED_PROBABILITIES["val"]).items(), strict=True)
        return str(index_rng(seed, split, index).choice(kinds, p=weights))

    def appearance_of(self, split: str, options: Mapping[str, Any]) -> str:
        """Whose appearance the exemplars of `split` have."""
        kind = options.get("exemplar_appearance", "auto")
        return AUTO_APPEARANCE.get(split, "independent") if kind == "auto" else kind

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
        stop = self.count(source, split, options) if stop is None else stop
        for first in range(start, stop, CHUNK):
            # A chunk at a time under one thread setting: switching the torch thread pool per sample
            # costs more than a 64 px face, and no setting stays changed while the caller runs.
            with one_intra_op_thread():
                indices = range(first, min(first + CHUNK, stop))
                chunk = [self.sample(split, options, seed, size, index) for index in indices]
            yield from chunk

    def sample(self, split: str, options: Mapping[str, Any], seed: int, size: int, index: int) -> Sample:
        """Sample `index` of `split`: a pair from `make_pair` with the split's own generator seed."""
        pairing = self.pairing_of(split, options, seed, index)
        pair = make_pair(index, split_seed(seed, split), size, options.get("variant", "official"), pairing,
                         self.appearance_of(split, options))
        return Sample(
            key=check_key(f"{split}{index:07d}"),
            image=pair["image"],
            cond=pair["cond"],
            ref=pair["ref"],
            ref_cond=pair["ref_cond"],
            oracle=pair["oracle"],
            meta={"id": f"{split}-{index:07d}", "split": split, "source": None, **pair["meta"]},
        )


PLUGIN = SynthFaces()
