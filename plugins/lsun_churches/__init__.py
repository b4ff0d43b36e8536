"""lsun-churches: LSUN church photos + ADE20K-150 label PNGs -> 151-channel one-hot.

Layout under --source: photos (`*.jpg`, `*.webp`, `*.png` that are not labels) with a label map of
the same name and the suffix `.png` beside each (the official `training/` and `validation/` folders
give the split; elsewhere it is hashed). Label value 255 means "unknown" and becomes id 150.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from midms_cli.conditions import CONDITIONS, ConditionSpec
from midms_cli.conditions.segmentation import one_hot_ade20k
from midms_cli.data.plugin import PluginOption
from midms_cli.data.sources import COMMON_OPTIONS, FolderDataset, list_photos
from midms_cli.errors import MidmsError

PHOTOS = (".jpg", ".jpeg", ".webp")
NATURAL_SPLITS = {"training": "train", "validation": "val"}


def load_labels(path: Path, size: int) -> torch.Tensor:
    """A single-channel label PNG -> (size, size) long ids, nearest resize; errors name the file."""
    if not path.is_file():
        raise MidmsError(
            f"label map {path} not found: lsun-churches needs an ADE20K label PNG beside each photo"
        )
    try:
        with Image.open(path) as handle:
            if handle.mode not in ("L", "P", "I", "I;16"):
                raise MidmsError(
                    f"label map {path} has mode {handle.mode}; expected single-channel ids (L or P)"
                )
            labels = np.asarray(handle.resize((size, size), Image.NEAREST)).astype(np.int64)
    except OSError as exc:
        raise MidmsError(f"cannot read label map {path}: {exc}") from exc
    return torch.from_numpy(labels)


class LSUNChurches(FolderDataset):
    name = "lsun-churches"
    description = "LSUN churches + ADE20K-150 label PNGs; condition: 151-channel one-hot segmentation"
    version = "1"
    options = COMMON_OPTIONS + (
        PluginOption("extract", bool, False, "photos without label PNGs: segment them with Swin-S UperNet "
                     "(needs `midms weights add swin-s-ade20k FILE`)"),
    )
    extractor_kind = "ade20k"  # Swin-S UperNet; ids = class + 1, as ADE20K's own PNGs

    def condition_spec(self, options: Mapping[str, Any]) -> ConditionSpec:
        return CONDITIONS["ade20k"]

    def all_items(self, source: Path, options: Mapping[str, Any]) -> list[str]:
        return list_photos(source, PHOTOS)

    def natural_split(self, item: str) -> str | None:
        return NATURAL_SPLITS.get(Path(item).parts[0]) if len(Path(item).parts) > 1 else None

    def photo_path(self, source: Path, item: str) -> Path:
        return source / item

    def condition(self, source, item, image: torch.Tensor, options, size) -> tuple[torch.Tensor, dict]:
        path = (source / item).with_suffix(".png")
        extracted = None if path.is_file() else self.extract(image, options)
        if extracted is not None:
            return extracted
        labels = load_labels(path, size)
        try:
            cond = one_hot_ade20k(labels.unsqueeze(0))[0]
        except ValueError as exc:
            raise MidmsError(f"label map {path}: {exc}") from exc
        return cond, {"labels": str(path)}


PLUGIN = LSUNChurches()
