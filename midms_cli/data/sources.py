"""Shared machinery of the plugins that read a real dataset folder (celebahq, deepfashion, lsun, folder).

A `FolderDataset` subclass says how to list its items and how to load one item's image and
condition; this base turns that into the plugin protocol: CoCosNet train/val lists or a hashed
split, exemplar pairing from a CoCosNet reference list or one built by appearance
similarity, and per-index randomness so any sample can be made alone, by any worker.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from midms_cli.conditions import ConditionSpec
from midms_cli.data.pairing import (
    EVAL_PAIRING,
    PairingProbabilities,
    appearance_feature,
    build_reference_list,
    choose_pairing,
    pick_reference,
    read_reference_list,
)
from midms_cli.data.plugin import BasePlugin, PluginOption, Sample, index_rng
from midms_cli.errors import MidmsError
from midms_cli.images import array_to_tensor, open_image, open_lazily, resize_pil, to_rgb_array

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
FEATURE_SIZE = 32  # images are read at this size to build a reference list by similarity

# Options every folder plugin shares (pairing, CoCosNet lists).
COMMON_OPTIONS = (
    PluginOption(
        "train_list", Path, None, "CoCosNet train.txt (one id/path per line); default: hashed split"
    ),
    PluginOption("val_list", Path, None, "CoCosNet val.txt; default: hashed split"),
    PluginOption("val_fraction", float, 0.05, "share of items in val when no lists are given"),
    PluginOption(
        "ref_list", Path, None, "CoCosNet reference list `key,cand1,...`; default: built by similarity"
    ),
    PluginOption("hard_probability", float, 0.2, "training: share of hard references (official 0.2)"),
    PluginOption("self_probability", float, 0.3, "training: share of self references; easy = the rest"),
)


def load_photo(path: Path, size: int, mode: str = "bicubic") -> torch.Tensor:
    """A photo file -> (3, size, size) in [-1, 1]; any problem is one MidmsError naming the file."""
    image = open_image(path)
    rgb = Image.fromarray(to_rgb_array(image))
    return array_to_tensor(np.asarray(resize_pil(rgb, size, mode)))


def list_photos(folder: Path, suffixes: tuple[str, ...] = PHOTO_SUFFIXES) -> list[str]:
    """Photo files under `folder` (recursive), as sorted POSIX paths relative to it; none is an error."""
    if not folder.is_dir():
        raise MidmsError(f"folder not found: {folder}")
    photos = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.suffix.lower() in suffixes and p.is_file()
    )
    if not photos:
        raise MidmsError(f"no photos ({', '.join(suffixes)}) under {folder}; check --source")
    return photos


def read_split_list(path: Path) -> list[str]:
    """A CoCosNet split file: one id or relative path per line."""
    try:
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise MidmsError(f"cannot read split list {path}: {exc}") from exc
    if not names:
        raise MidmsError(f"split list {path} is empty")
    return names


def hashed_split(name: str, val_fraction: float) -> str:
    """A stable split for datasets without lists: sha1 of the item name, not its position."""
    bucket = int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big") / 2**64
    return "val" if bucket < val_fraction else "train"


def name_lookup(names: list[str]):
    """Match the names of CoCosNet lists to items: exact, without a leading `img/`, or by file stem
    (`12` or `12.jpg` for `12.jpg`) where the stem is unique."""
    exact = set(names)
    stems: dict[str, list[str]] = {}
    for name in names:
        stems.setdefault(Path(name).stem, []).append(name)

    def lookup(name: str) -> str | None:
        for candidate in (name, name.removeprefix("img/")):
            if candidate in exact:
                return candidate
        matches = stems.get(Path(name).stem, [])
        return matches[0] if len(matches) == 1 else None

    return lookup


@dataclass(frozen=True)
class Loaded:
    """One item read from disk: image (3, S, S) in [-1, 1], condition (C, S, S) in [0, 1], its files."""

    image: torch.Tensor
    cond: torch.Tensor
    files: dict[str, str]


class FolderDataset(BasePlugin, abc.ABC):
    """Base of the real-dataset plugins: subclasses define `all_items`, `photo_path`, `condition` and
    `condition_spec`."""

    needs_source = True
    easy = "first"  # first retrieval candidate (CelebA, LSUN); DeepFashion overrides
    hard = "last"  # last retrieval candidate; DeepFashion: a random training image
    resize = "bicubic"  # official (torchvision Resize on PIL); CelebA-HQ uses bilinear
    extractor_kind: str | None = None  # the condition extractor of `--extract` (midms_cli.extractors)
    options: tuple[PluginOption, ...] = COMMON_OPTIONS

    # To be defined by each dataset.

    @abc.abstractmethod
    def all_items(self, source: Path, options: Mapping[str, Any]) -> list[str]:
        """Every item of the dataset, as names the split and reference lists use."""

    @abc.abstractmethod
    def photo_path(self, source: Path, item: str) -> Path:
        """The photo file of an item."""

    @abc.abstractmethod
    def condition(
        self, source: Path, item: str, image: torch.Tensor, options: Mapping[str, Any], size: int
    ) -> tuple[torch.Tensor, dict[str, str]]:
        """The item's condition (C, size, size) in [0, 1] and the files it was read from."""

    @abc.abstractmethod
    def condition_spec(self, options: Mapping[str, Any]) -> ConditionSpec:
        """The condition kind these options produce."""

    def _extractor(self, options: Mapping[str, Any]) -> Any:
        """The condition extractor when `--extract` is on (missing weights: MidmsError), else None."""
        if self.extractor_kind is None or not options.get("extract"):
            return None
        from midms_cli.extractors import get_extractor  # looked up at call time: tests swap it

        return get_extractor(self.extractor_kind)

    def extract(self, image: torch.Tensor, options: Mapping[str, Any]) -> tuple[torch.Tensor, dict] | None:
        """With `--extract`, the condition estimated from the photo (3, S, S) and the estimator's name
        in place of source files; None without it, so the caller reports the missing annotation."""
        extractor = self._extractor(options)
        if extractor is None:
            return None
        return extractor(image.unsqueeze(0))[0], {"estimator": extractor.metadata["estimator"]}

    def load(self, source: Path, item: str, options: Mapping[str, Any], size: int) -> Loaded:
        path = self.photo_path(source, item)
        image = load_photo(path, size, self.resize)
        cond, files = self.condition(source, item, image, options, size)
        return Loaded(image, cond, {"image": str(path), **files})

    # Split and reference lists, cached per process.

    def items(self, source: Path, split: str, options: Mapping[str, Any]) -> list[str]:
        return list(self._items(Path(source), split, _freeze(options)))

    def natural_split(self, item: str) -> str | None:
        """The split a dataset's own layout gives an item (e.g. LSUN training/ validation/), or None."""
        return None

    @functools.lru_cache(maxsize=8)  # noqa: B019 - plugins are module-level singletons
    def _items(self, source: Path, split: str, frozen: tuple) -> tuple[str, ...]:
        options = dict(frozen)
        everything = self.all_items(source, options)
        listed = options.get(f"{split}_list")
        if listed is None:
            chosen = []
            for name in everything:
                natural = self.natural_split(name)
                if (natural or hashed_split(name, float(options["val_fraction"]))) == split:
                    chosen.append(name)
            return tuple(chosen)
        lookup = name_lookup(everything)
        chosen = []
        for name in read_split_list(Path(listed)):
            match = lookup(name)
            if match is None:
                raise MidmsError(f"{listed}: item {name!r} is not in {source}")
            chosen.append(match)
        return tuple(chosen)

    @functools.lru_cache(maxsize=8)  # noqa: B019
    def _references(self, source: Path, split: str, frozen: tuple) -> dict[str, list[str]]:
        options = dict(frozen)
        items = self._items(source, split, frozen)
        if options.get("ref_list") is not None:
            listed = read_reference_list(Path(options["ref_list"]))
            lookup = name_lookup(self.all_items(source, options))
            by_item = {lookup(key): candidates for key, candidates in listed.items()}
            return {item: [lookup(c) or c for c in by_item.get(item, [])] for item in items}
        readable, features = [], []
        for item in items:
            try:
                features.append(appearance_feature(self.feature_image(source, item)))
                readable.append(item)
            except MidmsError:  # reported when that item's own sample is made; never an exemplar
                continue
        references: dict[str, list[str]] = {item: [] for item in items}
        if len(readable) >= 2:
            references.update(build_reference_list(readable, torch.stack(features)))
        return references

    def feature_image(self, source: Path, item: str) -> torch.Tensor:
        """A small copy of an item's photo for retrieval; JPEGs are decoded at reduced scale (draft)."""
        path = self.photo_path(source, item)
        # The pixel limit applies here too: an oversized photo is skipped as its own sample is,
        # instead of being decoded in full (or stopping the whole run) while the list is built.
        handle = open_lazily(path)
        try:
            with handle, warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                handle.draft("RGB", (2 * FEATURE_SIZE, 2 * FEATURE_SIZE))  # a no-op for non-JPEG files
                small = handle.convert("RGB").resize((FEATURE_SIZE, FEATURE_SIZE), Image.BILINEAR)
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
            raise MidmsError(f"image {path} is corrupt or unreadable ({exc})") from exc
        return array_to_tensor(np.asarray(small))

    def probabilities(self, split: str, options: Mapping[str, Any]) -> PairingProbabilities:
        """The official mix for training; evaluation always takes the first (easy) candidate."""
        if split != "train":
            return EVAL_PAIRING
        hard, self_ = float(options["hard_probability"]), float(options["self_probability"])
        return PairingProbabilities(hard=hard, easy=1.0 - hard - self_, self=self_)

    # The plugin protocol.

    def count(self, source: Path | None, split: str, options: Mapping[str, Any]) -> int:
        self.probabilities(split, options)  # a bad --hard-probability fails here, before any sample
        self._extractor(options)  # and so do missing --extract weights
        return len(self.items(Path(source), split, options))

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
        source = Path(source)
        frozen = _freeze(options)
        items = self._items(source, split, frozen)
        stop = len(items) if stop is None else stop
        probabilities = self.probabilities(split, options)
        for index in range(start, stop):
            item = items[index]
            rng = index_rng(seed, split, index)
            pairing = choose_pairing(float(rng.random()), probabilities)
            candidates = [] if pairing == "self" else self._references(source, split, frozen)[item]
            if not candidates and pairing != "self" and not (pairing == "hard" and self.hard == "random"):
                pairing = "self"  # no candidate (a one-item split, an item missing from --ref-list)
            reference = pick_reference(item, pairing, candidates, items, rng, easy=self.easy, hard=self.hard)
            loaded = self.load(source, item, options, size)
            ref = loaded if reference == item else self.load(source, reference, options, size)
            yield Sample(
                key=f"{split}{index:07d}",
                image=loaded.image,
                cond=loaded.cond,
                ref=ref.image,
                ref_cond=ref.cond,
                meta={"id": item, "ref_id": reference, "pairing": pairing, "split": split,
                      "source": loaded.files, "ref_source": ref.files},
            )  # fmt: skip


def _freeze(options: Mapping[str, Any]) -> tuple:
    """Options as a hashable key for the per-process caches."""
    return tuple(sorted((k, os.fspath(v) if isinstance(v, Path) else v) for k, v in options.items()))
