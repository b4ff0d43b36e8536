"""Condition maps: the registry of condition kinds and the pure tensor renderers behind them.

Every renderer is a batched, device-agnostic function (tensor in, tensor out); file formats live in
`midms_cli.conditions.io`. Kinds and channel counts follow the official data loaders (celebahq-edges, 15),
(openpose, 20) and 3.4 (ade20k, 151); `canny` is the single-channel edge map of any photo.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from midms_cli.errors import MidmsError


@dataclass(frozen=True)
class ConditionSpec:
    """A condition kind: its channel count and whether it can be computed from a bare photo."""

    kind: str
    channels: int
    extract_from_photo: bool
    description: str = ""


CONDITIONS: dict[str, ConditionSpec] = {
    spec.kind: spec
    for spec in (
        ConditionSpec(
            "celebahq-edges", 15, False,
            "official CelebA-HQ recipe: part boundaries + Canny, 13 part distance maps, boundaries",
        ),
        ConditionSpec("canny", 1, True, "Canny edges of the grayscale photo (kornia, skimage defaults)"),
        ConditionSpec(
            "openpose", 20, False, "OpenPose 18-keypoint stick figure (RGB) + 17 limb distance maps (3.3)"
        ),
        ConditionSpec("ade20k", 151, False, "ADE20K-150 segmentation, one-hot over ids 0..150"),
    )
}  # fmt: skip


def condition_spec(kind: str) -> ConditionSpec:
    """The registered spec of `kind`, or a user error listing the known kinds."""
    if kind not in CONDITIONS:
        raise MidmsError(f"unknown condition kind {kind!r}; known kinds: {', '.join(CONDITIONS)}")
    return CONDITIONS[kind]


def extract_condition(kind: str, image: torch.Tensor) -> torch.Tensor:
    """The condition of kind `kind` computed from photos (B, 3, H, W) in [-1, 1] -> (B, C, H, W) in [0, 1].

    Only `canny` is extractable from a bare photo; the others need annotations (part masks,
    keypoints, label maps) that `midms_cli.conditions.io.load_condition` reads.
    """
    spec = condition_spec(kind)
    if not spec.extract_from_photo:
        raise MidmsError(
            f"a {kind!r} condition cannot be computed from a photo; give the condition file itself "
            f"(see `midms_cli.conditions.io.load_condition`) or use kind 'canny'"
        )
    from midms_cli.conditions.canny import canny_edges

    return canny_edges(image)
