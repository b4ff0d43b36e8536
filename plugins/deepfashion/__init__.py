"""deepfashion: DeepFashion In-shop photos + OpenPose keypoints -> the pose condition.

Layout under --source (CoCosNet's): photos under `img/` (e.g. `img/MEN/Denim/id_00000080/01_1_front.jpg`)
and keypoints under `pose/` with the same relative path: `pose/.../01_1_front_candidate.txt` +
`_subset.txt` (pytorch-openpose text files) or `pose/.../01_1_front_keypoints.json` (OpenPose JSON).
Keypoints are scaled from the photo's pixel size to --size. Pairing follows the official loader
for DeepFashion: easy = last entry of the reference line, hard = a random training image.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from midms_cli.conditions import CONDITIONS, ConditionSpec
from midms_cli.conditions.pose import read_openpose_candidate_subset, read_openpose_json, render_pose
from midms_cli.data.plugin import PluginOption
from midms_cli.data.sources import COMMON_OPTIONS, FolderDataset, list_photos
from midms_cli.errors import MidmsError


def keypoint_files(source: Path, item: str) -> dict[str, Path]:
    """The pose files of a photo `img/<rel>.jpg`: candidate + subset text files, else a keypoint JSON."""
    stem = source / "pose" / Path(item).with_suffix("")
    candidate, subset = Path(f"{stem}_candidate.txt"), Path(f"{stem}_subset.txt")
    if candidate.is_file() and subset.is_file():
        return {"candidate": candidate, "subset": subset}
    for json_path in (Path(f"{stem}_keypoints.json"), Path(f"{stem}.json")):
        if json_path.is_file():
            return {"keypoints": json_path}
    raise MidmsError(
        f"no OpenPose keypoints for {source / 'img' / item}: expected {candidate} and {subset} "
        f"(or {stem}_keypoints.json); run OpenPose first, or pass --extract to estimate them"
    )


class DeepFashion(FolderDataset):
    name = "deepfashion"
    description = "DeepFashion In-shop + OpenPose keypoints; condition: 18-keypoint stick figure + limb maps"
    version = "1"
    easy = "last"  # DeepFashion's easy reference is the last entry of its line
    hard = "random"  # and its hard reference a random training image
    options = COMMON_OPTIONS + (
        PluginOption("extract", bool, False, "photos without pose files: estimate keypoints with OpenPose "
                     "(needs `midms weights add openpose-body FILE`)"),
    )
    extractor_kind = "openpose"  # OpenPose on the photo at --size, drawn by the pose renderer

    def condition_spec(self, options: Mapping[str, Any]) -> ConditionSpec:
        return CONDITIONS["openpose"]

    def all_items(self, source: Path, options: Mapping[str, Any]) -> list[str]:
        if not (source / "img").is_dir() or not ((source / "pose").is_dir() or options.get("extract")):
            raise MidmsError(
                f"{source} must hold img/ (photos) and pose/ (OpenPose files) as in CoCosNet's layout"
            )
        return list_photos(source / "img")

    def photo_path(self, source: Path, item: str) -> Path:
        return source / "img" / item

    def condition(self, source, item, image: torch.Tensor, options, size) -> tuple[torch.Tensor, dict]:
        try:
            files = keypoint_files(source, item)
        except MidmsError:
            extracted = self.extract(image, options)
            if extracted is None:
                raise
            return extracted
        if "keypoints" in files:
            keypoints = read_openpose_json(files["keypoints"])
        else:
            keypoints = read_openpose_candidate_subset(files["candidate"], files["subset"])
        with Image.open(self.photo_path(source, item)) as handle:  # header only: the original pixel size
            width, height = handle.size
        present = keypoints[:, 2] >= 0
        scale = torch.tensor([size / width, size / height])
        keypoints[present, :2] = keypoints[present, :2] * scale
        cond = render_pose(keypoints.unsqueeze(0), size)[0]
        return cond, {name: str(path) for name, path in files.items()}


PLUGIN = DeepFashion()
