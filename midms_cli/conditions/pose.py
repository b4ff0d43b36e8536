"""The DeepFashion pose condition: OpenPose 18-keypoint stick figure + 17 limb distance maps.

Drawn with OpenCV exactly as the official DeepFashion loader (CoCosNet's, reused by MIDMs) draws
it, so a model sees the conditions it was trained on: `cv2.circle` (radius 4, filled) per present
keypoint, then per limb `cv2.ellipse2Poly` + `cv2.fillConvexPoly` on a copy of the canvas and
`cv2.addWeighted(canvas, 0.4, copy, 0.6, 0)`, in BGR, shown as RGB; each limb's distance map is
`cv2.distanceTransform(DIST_L1, 3)` of its filled polygon, / 3, clipped to 255, truncated to uint8.
OpenCV's filled shapes include their boundary pixels, which no pixel-centre test reproduces.
Also readers for OpenPose candidate/subset text files and OpenPose JSON keypoints.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from midms_cli.conditions.distance import DISTANCE_CLIP, DISTANCE_DIVISOR
from midms_cli.errors import MidmsError

POSE_CHANNELS = 20  # 3 RGB stick figure + 17 limb distance maps
NUM_KEYPOINTS = 18  # COCO-18 order: nose, neck, r-shoulder, ..., l-ear
KEYPOINT_RADIUS = 4
STICK_WIDTH = 4  # half-width of a limb ellipse
BLEND_OLD, BLEND_NEW = 0.4, 0.6  # cv2.addWeighted(canvas, 0.4, limb_canvas, 0.6, 0) after each limb

# The OpenPose palette (cv2 BGR order).
PALETTE_BGR = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip
# The picture is converted BGR -> RGB, so in RGB the first and last components swap.
PALETTE_RGB = tuple((b, g, r) for r, g, b in PALETTE_BGR)

# The first 17 OpenPose limbs, 1-based keypoint pairs; OpenPose's 3-17 and 6-18 are not drawn.
LIMBS = (
    (2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11),
    (2, 12), (12, 13), (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18),
)  # fmt: skip

# COCO-18 keypoints inside OpenPose's BODY_25 layout (BODY_25 adds mid-hip at 8 and six foot points).
BODY25_TO_COCO18 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)


def limb_polygon(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The limb p-q as OpenCV's ellipse polygon: centre (int(mean x), int(mean y)), half-axes
    (int(length / 2), 4), rotated by int(degrees(atan2(dy, dx))), one point per degree."""
    length = math.hypot(p[0] - q[0], p[1] - q[1])
    angle = math.degrees(math.atan2(p[1] - q[1], p[0] - q[0]))
    centre = (int((p[0] + q[0]) / 2), int((p[1] + q[1]) / 2))
    return cv2.ellipse2Poly(centre, (int(length / 2), STICK_WIDTH), int(angle), 0, 360, 1)


def draw_pose(keypoints: np.ndarray, height: int, width: int) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """(BGR uint8 stick figure (H, W, 3), per limb its filled uint8 mask or None when a joint is missing)
    for (18, 3) float64 keypoints [x, y, score] in pixels (score < 0 = missing)."""
    present = keypoints[:, 2] >= 0
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for i in range(NUM_KEYPOINTS):
        if present[i]:
            x, y = keypoints[i, :2]
            cv2.circle(canvas, (int(x), int(y)), KEYPOINT_RADIUS, PALETTE_BGR[i], thickness=-1)
    masks: list[np.ndarray | None] = []
    for i, (a, b) in enumerate(LIMBS):
        if not (present[a - 1] and present[b - 1]):
            masks.append(None)
            continue
        polygon = limb_polygon(keypoints[a - 1], keypoints[b - 1])
        limb_canvas = canvas.copy()
        cv2.fillConvexPoly(limb_canvas, polygon, PALETTE_BGR[i])
        canvas = cv2.addWeighted(canvas, BLEND_OLD, limb_canvas, BLEND_NEW, 0)
        mask = np.zeros((height, width), dtype=np.uint8)
        cv2.fillConvexPoly(mask, polygon, 255)
        masks.append(mask)
    return canvas, masks


def limb_distance(mask: np.ndarray | None, height: int, width: int) -> np.ndarray:
    """uint8 map: L1 distance to the limb's pixels / 3, clipped to 255 (all 255 for a missing limb)."""
    if mask is None:
        return np.full((height, width), int(DISTANCE_CLIP), dtype=np.uint8)
    distance = cv2.distanceTransform(255 - mask, cv2.DIST_L1, 3)
    return np.clip(distance / DISTANCE_DIVISOR, 0, DISTANCE_CLIP).astype(np.uint8)


def render_pose_uint8(keypoints: np.ndarray, height: int, width: int) -> np.ndarray:
    """(20, H, W) uint8 condition of one person: RGB stick figure, then the 17 limb distance maps."""
    canvas, masks = draw_pose(np.asarray(keypoints, dtype=np.float64), height, width)
    figure = canvas[:, :, ::-1].transpose(2, 0, 1)  # BGR -> RGB, channels first
    distances = np.stack([limb_distance(mask, height, width) for mask in masks])
    return np.concatenate([figure, distances])


def render_pose(keypoints: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """(B, 18, 3) keypoints [x, y, score] in pixels (score < 0 = missing) -> (B, 20, H, W) in [0, 1]:
    RGB stick figure, then one L1 distance map per limb (a missing limb is all ones), each 8-bit
    value / 255 as torchvision's ToTensor gives it. Drawn on the CPU; returned on the keypoints' device.
    """
    height, width = (size, size) if isinstance(size, int) else size
    if keypoints.dim() != 3 or keypoints.shape[1:] != (NUM_KEYPOINTS, 3):
        raise ValueError(f"render_pose expects keypoints (B, 18, 3), got {tuple(keypoints.shape)}")
    points = keypoints.detach().to("cpu", torch.float64).numpy()
    rendered = np.stack([render_pose_uint8(person, height, width) for person in points])
    return torch.from_numpy(rendered).to(keypoints.device).float() / 255.0


def render_pose_at_photo_size(
    keypoints: torch.Tensor, photo_size: tuple[int, int], size: int
) -> torch.Tensor:
    """The official loader's route for (18, 3) keypoints in the pixels of a photo (width, height):
    drawn at the photo's own size, then the stick figure resized to size x size with PIL's nearest
    and each distance map with PIL's bilinear (torchvision's Resize on a PIL picture). (20, size, size)."""
    width, height = photo_size
    if (width, height) == (size, size):
        return render_pose(keypoints[None], size)[0]
    rendered = render_pose_uint8(keypoints.detach().to("cpu", torch.float64).numpy(), height, width)
    figure = np.asarray(Image.fromarray(np.ascontiguousarray(rendered[:3].transpose(1, 2, 0)))
                        .resize((size, size), Image.NEAREST)).transpose(2, 0, 1)
    distances = [np.asarray(Image.fromarray(m).resize((size, size), Image.BILINEAR)) for m in rendered[3:]]
    return torch.from_numpy(np.concatenate([figure, np.stack(distances)])).float() / 255.0


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
    keypoint count. The person with the highest total score is kept (single person assumed).
    float64, as the official loader reads them with np.loadtxt.
    """
    candidate = _load_table(Path(candidate_path), 4)
    subset = _load_table(Path(subset_path), NUM_KEYPOINTS + 2)
    keypoints = torch.full((NUM_KEYPOINTS, 3), -1.0, dtype=torch.float64)
    if len(subset) == 0:
        return keypoints
    person = subset[int(np.argmax(subset[:, NUM_KEYPOINTS]))]
    for i, index in enumerate(person[:NUM_KEYPOINTS].astype(int)):
        if index < 0:
            continue
        if index >= len(candidate):
            raise MidmsError(f"{subset_path}: keypoint {i} points to candidate {index}, which does not exist")
        x, y, score = candidate[index, :3]
        keypoints[i] = torch.tensor([x, y, max(score, 0.0)], dtype=torch.float64)
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
    keypoints = torch.full((NUM_KEYPOINTS, 3), -1.0, dtype=torch.float64)
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
            keypoints[i] = torch.tensor([x, y, confidence], dtype=torch.float64)
    return keypoints
