"""The DeepFashion pose condition: OpenPose 18-keypoint stick figure + 17 limb distance maps.

Rasterisation is done here in torch (no OpenCV): a pixel belongs to a circle or ellipse when its
centre lies inside the exact shape. OpenCV's polygon-based drawing can differ by one pixel along the
rim, so edge pixels may differ from the official pictures; interiors, colours and blending match.
Also readers for OpenPose candidate/subset text files and OpenPose JSON keypoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from midms_cli.conditions.distance import distance_map
from midms_cli.errors import MidmsError

POSE_CHANNELS = 20  # 3 RGB stick figure + 17 limb distance maps
NUM_KEYPOINTS = 18  # COCO-18 order: nose, neck, r-shoulder, ..., l-ear
KEYPOINT_RADIUS = 4
STICK_WIDTH = 4  # half-width of a limb ellipse
BLEND_OLD, BLEND_NEW = 0.4, 0.6  # cv2.addWeighted(canvas, 0.4, limb_canvas, 0.6, 0) after each limb

# The OpenPose palette of the official loader (cv2 BGR order).
PALETTE_BGR = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip
# The picture is converted BGR -> RGB, so in RGB the first and last components swap.
PALETTE_RGB = tuple((b, g, r) for r, g, b in PALETTE_BGR)

# The first 17 OpenPose limbs, 1-based keypoint pairs of the official loader; 3-17 and 6-18 are not drawn.
LIMBS = (
    (2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11),
    (2, 12), (12, 13), (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18),
)  # fmt: skip

# COCO-18 keypoints inside OpenPose's BODY_25 layout (BODY_25 adds mid-hip at 8 and six foot points).
BODY25_TO_COCO18 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)


def _pixel_grid(height: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    ys, xs = torch.meshgrid(
        torch.arange(height, device=device, dtype=torch.float32),
        torch.arange(width, device=device, dtype=torch.float32),
        indexing="ij",
    )
    return xs, ys


def keypoint_disks(keypoints: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 18, H, W) bool: filled circles of radius 4 at int(x), int(y) of each present keypoint."""
    xs, ys = _pixel_grid(height, width, keypoints.device)
    cx = keypoints[..., 0].trunc().view(*keypoints.shape[:2], 1, 1)  # cv2 receives int(x), int(y)
    cy = keypoints[..., 1].trunc().view(*keypoints.shape[:2], 1, 1)
    inside = (xs - cx) ** 2 + (ys - cy) ** 2 <= KEYPOINT_RADIUS**2
    present = (keypoints[..., 2] >= 0).view(*keypoints.shape[:2], 1, 1)
    return inside & present


def limb_ellipses(keypoints: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 17, H, W) bool: the filled limb ellipses of the official loader (all False for a missing limb).

    As in the official drawing: centre (int(mean x), int(mean y)), half-axes (int(length / 2), 4),
    rotated by int(degrees(atan2(dy, dx))).
    """
    xs, ys = _pixel_grid(height, width, keypoints.device)
    first = torch.tensor([a - 1 for a, _ in LIMBS], device=keypoints.device)
    second = torch.tensor([b - 1 for _, b in LIMBS], device=keypoints.device)
    p, q = keypoints[:, first], keypoints[:, second]  # (B, 17, 3)
    centre_x = ((p[..., 0] + q[..., 0]) / 2).trunc()
    centre_y = ((p[..., 1] + q[..., 1]) / 2).trunc()
    length = torch.sqrt((p[..., 0] - q[..., 0]) ** 2 + (p[..., 1] - q[..., 1]) ** 2)
    half_length = (length / 2).trunc().clamp(min=0.5)  # a zero axis degenerates to a line
    angle = torch.deg2rad(torch.rad2deg(torch.atan2(p[..., 1] - q[..., 1], p[..., 0] - q[..., 0])).trunc())
    shape = (*angle.shape, 1, 1)
    dx, dy = xs - centre_x.view(shape), ys - centre_y.view(shape)
    cos, sin = torch.cos(angle).view(shape), torch.sin(angle).view(shape)
    along, across = dx * cos + dy * sin, -dx * sin + dy * cos
    inside = (along / half_length.view(shape)) ** 2 + (across / STICK_WIDTH) ** 2 <= 1.0
    present = ((p[..., 2] >= 0) & (q[..., 2] >= 0)).view(shape)
    return inside & present


def stick_figure(
    keypoints: torch.Tensor, height: int, width: int, limbs: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, 3, H, W) RGB stick figure in [0, 1], 8-bit values as the official picture.

    Circles are painted opaquely in keypoint order (the last circle covering a pixel wins); after
    each limb the canvas becomes round(0.4 * old + 0.6 * new), where `new` is the canvas with that
    limb filled in its colour, so only pixels inside the limb change. `limbs` may pass in
    precomputed `limb_ellipses`.
    """
    colours = torch.tensor(PALETTE_RGB, dtype=torch.float32, device=keypoints.device)  # (18, 3)
    disks = keypoint_disks(keypoints, height, width)  # (B, 18, H, W)
    order = torch.arange(1, NUM_KEYPOINTS + 1, device=keypoints.device).view(1, -1, 1, 1)
    last = (disks * order).amax(dim=1)  # (B, H, W): 1 + index of the last circle, 0 = none
    palette = torch.cat([torch.zeros(1, 3, device=keypoints.device), colours])
    canvas = palette[last].permute(0, 3, 1, 2)  # (B, 3, H, W)
    if limbs is None:
        limbs = limb_ellipses(keypoints, height, width)
    for i in range(len(LIMBS)):
        blended = torch.round(BLEND_OLD * canvas + BLEND_NEW * colours[i].view(1, 3, 1, 1))
        canvas = torch.where(limbs[:, i : i + 1], blended, canvas)
    return canvas / 255.0


def render_pose(keypoints: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """The 20-channel pose condition: (B, 18, 3) keypoints [x, y, score] in pixels (score < 0 = missing)
    -> (B, 20, H, W) in [0, 1]: RGB stick figure, then one L1 distance map per limb
    (distance to the limb ellipse, /3, clip 255, uint8, /255; a missing limb is all ones).
    """
    height, width = (size, size) if isinstance(size, int) else size
    keypoints = keypoints.float()
    if keypoints.dim() != 3 or keypoints.shape[1:] != (NUM_KEYPOINTS, 3):
        raise ValueError(f"render_pose expects keypoints (B, 18, 3), got {tuple(keypoints.shape)}")
    limbs = limb_ellipses(keypoints, height, width)
    figure = stick_figure(keypoints, height, width, limbs)
    distances = distance_map(limbs)
    return torch.cat([figure, distances], dim=1)


# --- Readers ---------------------------------------------------------------------------------------------


def _load_table(path: Path, columns: int) -> np.ndarray:
    try:
        text = path.read_text()
    except OSError as exc:
        raise MidmsError(f"cannot read OpenPose file {path}: {exc}") from exc
    rows = [line.split() for line in text.splitlines() if line.strip()]
    try:
        table = np.array(rows, dtype=np.float64).reshape(-1, columns) if rows else np.zeros((0, columns))
    except ValueError as exc:
        raise MidmsError(f"{path}: expected rows of {columns} numbers (OpenPose format)") from exc
    return table


def read_openpose_candidate_subset(candidate_path: str | Path, subset_path: str | Path) -> torch.Tensor:
    """OpenPose (pytorch-openpose) text files -> (18, 3) keypoints [x, y, score], score -1 if missing.

    candidate rows: x y score id; subset rows: 18 candidate indices (-1 = missing), total score,
    keypoint count. The person with the highest total score is kept (one person assumed, as officially).
    """
    candidate = _load_table(Path(candidate_path), 4)
    subset = _load_table(Path(subset_path), NUM_KEYPOINTS + 2)
    keypoints = torch.full((NUM_KEYPOINTS, 3), -1.0)
    if len(subset) == 0:
        return keypoints
    person = subset[int(np.argmax(subset[:, NUM_KEYPOINTS]))]
    for i, index in enumerate(person[:NUM_KEYPOINTS].astype(int)):
        if index < 0:
            continue
        if index >= len(candidate):
            raise MidmsError(f"{subset_path}: keypoint {i} points to candidate {index}, which does not exist")
        x, y, score = candidate[index, :3]
        keypoints[i] = torch.tensor([x, y, max(score, 0.0)])
    return keypoints


def read_openpose_json(path: str | Path) -> torch.Tensor:
    """OpenPose JSON -> (18, 3) keypoints [x, y, score] of the most confident person.

    Format: {"people": [{"pose_keypoints_2d": [x0, y0, c0, x1, y1, c1, ...]}, ...]} with 18 COCO
    points (54 numbers) or OpenPose's BODY_25 (75 numbers; its COCO-18 subset is taken). A point with
    confidence 0 (OpenPose writes 0, 0, 0) is missing. No person -> every keypoint missing.
    """
    path = Path(path)
    try:
        people = json.loads(path.read_text())["people"]
        flats = [np.asarray(person["pose_keypoints_2d"], dtype=np.float64) for person in people]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MidmsError(f"{path}: not an OpenPose keypoint JSON ({type(exc).__name__}: {exc})") from exc
    keypoints = torch.full((NUM_KEYPOINTS, 3), -1.0)
    if not flats:
        return keypoints
    best = max(flats, key=lambda flat: float(flat[2::3].sum()))
    if best.size == 75:
        points = best.reshape(25, 3)[list(BODY25_TO_COCO18)]
    elif best.size == 3 * NUM_KEYPOINTS:
        points = best.reshape(NUM_KEYPOINTS, 3)
    else:
        raise MidmsError(
            f"{path}: pose_keypoints_2d has {best.size} numbers, expected 54 (COCO-18) or 75 (BODY_25)"
        )
    for i, (x, y, confidence) in enumerate(points):
        if confidence > 0:
            keypoints[i] = torch.tensor([x, y, confidence])
    return keypoints
