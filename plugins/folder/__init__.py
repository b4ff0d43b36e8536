"""folder: any folder of photos, with Canny edges as the condition.

Items are the photo files under --source (recursive); the split is hashed from the file name
unless CoCosNet-style lists are given, and exemplars come from a reference list built by
appearance similarity (midms_cli.data.pairing) unless one is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from midms_cli.conditions import CONDITIONS, ConditionSpec
from midms_cli.conditions.canny import canny_edges
from midms_cli.data.sources import FolderDataset, list_photos


class FolderPhotos(FolderDataset):
    name = "folder"
    description = "any folder of photos; condition: Canny edges (kornia, scikit-image defaults)"
    version = "1"

    def condition_spec(self, options: Mapping[str, Any]) -> ConditionSpec:
        return CONDITIONS["canny"]

    def all_items(self, source: Path, options: Mapping[str, Any]) -> list[str]:
        return list_photos(source)

    def photo_path(self, source: Path, item: str) -> Path:
        return source / item

    def condition(self, source, item, image: torch.Tensor, options, size) -> tuple[torch.Tensor, dict]:
        return canny_edges(image.unsqueeze(0))[0], {}


PLUGIN = FolderPhotos()
