"""celebahq: CelebAMask-HQ photos and part masks -> the CelebA-HQ edge condition.

Layout under --source: `CelebA-HQ-img/{id}.jpg` and
`CelebAMask-HQ-mask-anno/{id // 2000}/{id:05d}_{part}.png`.
Variant `official` renders the 15-channel recipe from the part masks and the photo; `canny` takes
plain Canny edges of the photo (no masks needed). CoCosNet `train.txt` / `val.txt` and
`celebahq_ref.txt` are used when given (options --train-list, --val-list, --ref-list).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from midms_cli.conditions import CONDITIONS, ConditionSpec
from midms_cli.conditions.canny import canny_edges
from midms_cli.conditions.celebahq import (
    CELEBAHQ_PARTS,
    celebamask_part_paths,
    load_part_masks,
    render_celebahq,
)
from midms_cli.data.plugin import PluginOption
from midms_cli.data.sources import COMMON_OPTIONS, FolderDataset
from midms_cli.errors import MidmsError

IMAGES = "CelebA-HQ-img"
MASKS = "CelebAMask-HQ-mask-anno"


class CelebAHQ(FolderDataset):
    name = "celebahq"
    description = "CelebAMask-HQ photos + part masks; condition: official 15-channel edge recipe or canny"
    version = "1"
    resize = "bilinear"  # as the official CelebA-HQ loader
    options = (
        PluginOption("variant", str, "official", "official 15-channel recipe (part masks) or canny",
                     choices=("official", "canny")),
        *COMMON_OPTIONS,
    )  # fmt: skip

    def condition_spec(self, options: Mapping[str, Any]) -> ConditionSpec:
        return CONDITIONS["celebahq-edges" if options.get("variant", "official") == "official" else "canny"]

    def all_items(self, source: Path, options: Mapping[str, Any]) -> list[str]:
        folder = source / IMAGES
        if not folder.is_dir():
            raise MidmsError(f"{folder} not found: --source must be a CelebAMask-HQ folder (with {IMAGES}/)")
        if options.get("variant", "official") == "official" and not (source / MASKS).is_dir():
            raise MidmsError(f"{source / MASKS} not found: the official variant needs the part masks "
                             f"(or use --variant canny)")  # fmt: skip
        names = [p.name for p in folder.iterdir() if p.suffix.lower() == ".jpg" and p.stem.isdigit()]
        if not names:
            raise MidmsError(f"no {{id}}.jpg photos in {folder}")
        return sorted(names, key=lambda name: int(Path(name).stem))

    def photo_path(self, source: Path, item: str) -> Path:
        return source / IMAGES / item

    def condition(self, source, item, image: torch.Tensor, options, size) -> tuple[torch.Tensor, dict]:
        if options.get("variant", "official") == "canny":
            return canny_edges(image.unsqueeze(0))[0], {}
        image_id = int(Path(item).stem)
        paths = celebamask_part_paths(source / MASKS, image_id)
        if not paths:
            expected = source / MASKS / str(image_id // 2000) / f"{image_id:05d}_{CELEBAHQ_PARTS[0]}.png"
            raise MidmsError(f"no part masks for {item}: expected files like {expected}")
        masks = load_part_masks(paths, size)  # (13, S, S) bool, nearest resize
        cond = render_celebahq(masks.unsqueeze(0), image.unsqueeze(0))[0]
        return cond, {"masks": str(source / MASKS / str(image_id // 2000))}


PLUGIN = CelebAHQ()
