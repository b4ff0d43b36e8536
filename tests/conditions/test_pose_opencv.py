"""The pose condition against the official DeepFashion loader's procedure, run here with OpenCV.

The reference below follows the official loader step by step (np.loadtxt of the pytorch-openpose
files, cv2 drawing in BGR at the photo's size, limb-by-limb blending, distance maps, PIL resizes)
and is written independently of midms_cli.conditions.pose; the two must agree to the last bit on
skeletons with missing joints, joints on and past the border, a zero-length limb and fractional
coordinates.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from midms_cli.conditions.pose import read_openpose_candidate_subset, render_pose, render_pose_at_photo_size

COLOURS_BGR = [
    [255, 0, 0], [255, 85, 0], [255, 170, 0], [255, 255, 0], [170, 255, 0], [85, 255, 0], [0, 255, 0],
    [0, 255, 85], [0, 255, 170], [0, 255, 255], [0, 170, 255], [0, 85, 255], [0, 0, 255], [85, 0, 255],
    [170, 0, 255], [255, 0, 255], [255, 0, 170], [255, 0, 85],
]  # fmt: skip
PAIRS = [[2, 3], [2, 6], [3, 4], [4, 5], [6, 7], [7, 8], [2, 9], [9, 10], [10, 11], [2, 12], [12, 13],
         [13, 14], [2, 1], [1, 15], [15, 17], [1, 16], [16, 18]]  # fmt: skip


def official_condition(candidate_file, subset_file, width, height, load_size):
    """(20, load_size, load_size) uint8: the official loader's label tensor x 255."""
    candidate = np.loadtxt(candidate_file, ndmin=2)
    subset = np.loadtxt(subset_file)
    canvas = np.zeros((height, width, 3), np.uint8)
    for joint in range(18):
        if int(subset[joint]) != -1:
            x, y = candidate[int(subset[joint])][:2]
            cv2.circle(canvas, (int(x), int(y)), 4, COLOURS_BGR[joint], thickness=-1)
    limb_masks = []
    for limb in range(17):
        ends = subset[np.array(PAIRS[limb]) - 1]
        if -1 in ends:
            limb_masks.append(np.zeros((height, width), np.uint8))
            continue
        xs, ys = candidate[ends.astype(int), 0], candidate[ends.astype(int), 1]
        half_length = int(((ys[0] - ys[1]) ** 2 + (xs[0] - xs[1]) ** 2) ** 0.5 / 2)
        degrees = int(math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1])))
        polygon = cv2.ellipse2Poly((int(np.mean(xs)), int(np.mean(ys))), (half_length, 4), degrees, 0, 360, 1)
        drawn = canvas.copy()
        cv2.fillConvexPoly(drawn, polygon, COLOURS_BGR[limb])
        canvas = cv2.addWeighted(canvas, 0.4, drawn, 0.6, 0)
        mask = np.zeros((height, width), np.uint8)
        cv2.fillConvexPoly(mask, polygon, 255)
        limb_masks.append(cv2.addWeighted(mask, 0.4, mask, 0.6, 0))
    picture = Image.fromarray(cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB))
    figure = np.asarray(picture.resize((load_size, load_size), resample=Image.NEAREST)).transpose(2, 0, 1)
    maps = []
    for mask in limb_masks:
        distance = np.clip(cv2.distanceTransform(255 - mask, cv2.DIST_L1, 3) / 3, 0, 255).astype(np.uint8)
        maps.append(np.asarray(Image.fromarray(distance).resize((load_size, load_size), Image.BILINEAR)))
    return np.concatenate([figure, np.stack(maps)])


def skeleton(seed, width, height):
    """18 keypoints (x, y) with some missing: a random pose, plus the awkward cases."""
    rng = np.random.default_rng(seed)
    points = np.stack([rng.uniform(-3, width + 3, 18), rng.uniform(-3, height + 3, 18)], 1)
    if seed % 2:
        points = np.round(points)  # integer coordinates: midpoints and lengths hit .5 exactly
    points[1] = points[2] + (0.0, 0.0) if seed == 3 else points[1]  # a zero-length limb (neck - shoulder)
    missing = rng.random(18) < (0.25 if seed else 0.0)
    return points, missing


def write_openpose(tmp_path, points, missing):
    present = [i for i in range(18) if not missing[i]]
    rows = [f"{float(points[i, 0])!r} {float(points[i, 1])!r} 0.9 {n}" for n, i in enumerate(present)]
    (tmp_path / "p_candidate.txt").write_text("\n".join(rows) + "\n")
    indices = [present.index(i) if i in present else -1 for i in range(18)]
    (tmp_path / "p_subset.txt").write_text(" ".join(map(str, indices + [12.5, len(present)])) + "\n")
    return tmp_path / "p_candidate.txt", tmp_path / "p_subset.txt"


@pytest.mark.parametrize(
    "seed, width, height, size",
    [(0, 64, 64, 64), (1, 64, 64, 64), (2, 96, 96, 96), (3, 64, 64, 64), (4, 48, 64, 32), (5, 80, 60, 40)],
)
def test_pose_condition_equals_the_official_loader_bit_for_bit(tmp_path, seed, width, height, size):
    points, missing = skeleton(seed, width, height)
    candidate, subset = write_openpose(tmp_path, points, missing)
    expected = official_condition(candidate, subset, width, height, size)
    keypoints = read_openpose_candidate_subset(candidate, subset)
    ours = render_pose_at_photo_size(keypoints, (width, height), size)
    assert ours.shape == (20, size, size) and ours.dtype == torch.float32
    as_uint8 = torch.round(ours * 255).to(torch.uint8).numpy()
    assert torch.equal(ours, torch.from_numpy(as_uint8).float() / 255)  # every value is k / 255
    differing = int((as_uint8 != expected).sum())
    assert differing == 0, f"{differing} values differ"
    assert (expected[3:].reshape(17, -1) == 255).all(1).sum() >= 1 or seed == 0  # missing limbs tested


def test_a_batch_renders_each_person_and_missing_limbs_are_all_ones():
    points, missing = skeleton(1, 40, 40)
    keypoints = torch.tensor(np.concatenate([points, np.where(missing, -1.0, 0.9)[:, None]], 1))
    none = torch.full((18, 3), -1.0, dtype=torch.float64)
    batch = render_pose(torch.stack([keypoints, none]), (40, 40))
    assert torch.equal(batch[0], render_pose(keypoints[None], 40)[0])
    assert torch.equal(batch[1, :3], torch.zeros(3, 40, 40))
    assert torch.equal(batch[1, 3:], torch.ones(17, 40, 40))
