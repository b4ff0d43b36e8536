"""The official CelebA-HQ 15-channel edge condition (the official loader's recipe, identical to CoCosNet).

Channels: [0] part boundaries + Canny edges outside the face parts, [1..13] per-part L1 distance
maps to that part's boundary, [14] part boundaries only. Also readers for CelebAMask-HQ part masks.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from midms_cli.conditions.canny import canny_edges
from midms_cli.conditions.distance import distance_map
from midms_cli.errors import MidmsError

# The 13 parts of the official recipe, in channel order 1..13.
CELEBAHQ_PARTS = (
    "skin", "l_brow", "r_brow", "l_eye", "r_eye", "l_ear", "r_ear",
    "nose", "u_lip", "mouth", "l_lip", "eye_g", "hair",
)  # fmt: skip
CELEBAHQ_CHANNELS = 15
HAIR = CELEBAHQ_PARTS.index("hair")


def part_boundaries(label: torch.Tensor) -> torch.Tensor:
    """Part boundaries: pixels whose label differs from the right/left/down/up neighbour.

    label: (..., H, W) any dtype. Both pixels of a differing pair are marked, so a step between two
    regions becomes a 2-pixel-wide line. Returns bool of the same shape.
    """
    edge = torch.zeros(label.shape, dtype=torch.bool, device=label.device)
    horizontal = label[..., :, 1:] != label[..., :, :-1]
    vertical = label[..., 1:, :] != label[..., :-1, :]
    edge[..., :, 1:] |= horizontal
    edge[..., :, :-1] |= horizontal
    edge[..., 1:, :] |= vertical
    edge[..., :-1, :] |= vertical
    return edge


def inner_label(part_masks: torch.Tensor) -> torch.Tensor:
    """The background mask: 1 outside the face parts (background, neck, clothes) and inside hair, else 0.

    The official loop sets 0 inside each part in order and hair (last) back to 1, so hair wins.
    part_masks: (B, 13, H, W) bool -> (B, 1, H, W) bool.
    """
    face = part_masks[:, :HAIR].any(dim=1, keepdim=True)
    return ~face | part_masks[:, HAIR : HAIR + 1]


def render_celebahq(part_masks: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
    """The 15-channel CelebA-HQ condition of the official recipe -> (B, 15, H, W) in [0, 1].

    part_masks: (B, 13, H, W) bool in CELEBAHQ_PARTS order (an all-False channel = missing part).
    image: (B, 3, H, W) in [-1, 1] for the Canny channel, or None when only the part masks are
    known (e.g. a part-label PNG): channel 0 then carries the part boundaries alone.
    """
    part_masks = part_masks.bool()
    boundaries = part_boundaries(part_masks)  # (B, 13, H, W): each part against its own complement
    edges = boundaries.any(dim=1, keepdim=True)  # (B, 1, H, W)
    distances = distance_map(boundaries)  # a missing part has no boundary -> all ones
    if image is not None:
        canny = canny_edges(image).bool() & inner_label(part_masks)
        edges_all = edges | canny
    else:
        edges_all = edges
    return torch.cat([edges_all.float(), distances, edges.float()], dim=1)


def part_masks_from_labels(labels: torch.Tensor) -> torch.Tensor:
    """A part-label map (..., H, W), value k = CELEBAHQ_PARTS[k-1] (0 = none) -> (..., 13, H, W) bool."""
    ids = torch.arange(1, len(CELEBAHQ_PARTS) + 1, device=labels.device)
    return labels.long().unsqueeze(-3) == ids.view(-1, 1, 1)


def celebamask_part_paths(annotation_root: str | Path, image_id: int) -> dict[str, Path]:
    """CelebAMask-HQ layout: {root}/{id // 2000}/{id:05d}_{part}.png; only the files that exist."""
    folder = Path(annotation_root) / str(image_id // 2000)
    paths = {part: folder / f"{image_id:05d}_{part}.png" for part in CELEBAHQ_PARTS}
    return {part: path for part, path in paths.items() if path.exists()}


def load_part_masks(paths: Mapping[str, str | Path], size: int) -> torch.Tensor:
    """Read a set of per-part binary mask PNGs into (13, size, size) bool, as the official loader does.

    `paths` maps part names to files; absent parts stay all False. Masks are resized with nearest
    neighbour as in the official code; a pixel is inside when its grey value is above 127 (the masks
    are 0/255, where this equals the official `== 255`).
    """
    from PIL import Image

    unknown = sorted(set(paths) - set(CELEBAHQ_PARTS))
    if unknown:
        raise MidmsError(f"unknown CelebAMask-HQ part(s) {unknown}; expected names from {CELEBAHQ_PARTS}")
    masks = torch.zeros(len(CELEBAHQ_PARTS), size, size, dtype=torch.bool)
    for part, path in paths.items():
        try:
            with Image.open(path) as handle:
                grey = handle.convert("L").resize((size, size), Image.NEAREST)
        except OSError as exc:
            raise MidmsError(f"cannot read part mask {path}: {exc}") from exc
        masks[CELEBAHQ_PARTS.index(part)] = torch.from_numpy(np.asarray(grey) > 127)
    return masks
