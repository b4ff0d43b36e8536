"""OpenPose stick figure and limb distance maps (spec 3.3) from hand-placed keypoints."""

import json

import pytest
import torch

from midms_cli.conditions.pose import (
    LIMBS,
    PALETTE_BGR,
    read_openpose_candidate_subset,
    read_openpose_json,
    render_pose,
)
from midms_cli.errors import MidmsError

SIZE = 48


def keypoints_with(points: dict[int, tuple[float, float]]) -> torch.Tensor:
    """(1, 18, 3) with the given 0-based keypoints present (score 1) and the rest missing."""
    keypoints = torch.full((1, 18, 3), -1.0)
    for index, (x, y) in points.items():
        keypoints[0, index] = torch.tensor([x, y, 1.0])
    return keypoints


def rgb(index):
    b, g, r = PALETTE_BGR[index][2], PALETTE_BGR[index][1], PALETTE_BGR[index][0]
    return torch.tensor([b, g, r], dtype=torch.float32)  # cv2 BGR drawn, shown as RGB: reversed


def test_limb_list_and_palette_order():
    assert len(LIMBS) == 17 and LIMBS[0] == (2, 3) and LIMBS[12] == (2, 1) and (3, 17) not in LIMBS
    assert rgb(0).tolist() == [0, 0, 255]  # palette [255, 0, 0] in BGR is blue in RGB


def test_keypoint_centres_limb_midpoints_and_alpha_blend():
    # Neck (index 1) at (10, 24), right shoulder (2) at (30, 24): limb 0 joins them (pair 2-3).
    cond = render_pose(keypoints_with({1: (10.0, 24.0), 2: (30.0, 24.0)}), SIZE)
    figure = cond[0, :3] * 255
    assert cond.shape == (1, 20, SIZE, SIZE)
    # Midpoint (20, 24): only limb 0 drawn there, over black: round(0.6 * colour).
    assert figure[:, 24, 20].tolist() == torch.round(0.6 * rgb(0)).tolist()
    # Keypoint centres lie inside the limb too: round(0.4 * circle colour + 0.6 * limb colour).
    assert figure[:, 24, 10].tolist() == torch.round(0.4 * rgb(1) + 0.6 * rgb(0)).tolist()
    assert figure[:, 24, 30].tolist() == torch.round(0.4 * rgb(2) + 0.6 * rgb(0)).tolist()
    # Circle pixels beyond the limb's tip (the ellipse spans x = 10..30) keep the keypoint colour exactly.
    assert figure[:, 24, 6].tolist() == rgb(1).tolist()  # on the radius-4 circle
    assert figure[:, 27, 9].tolist() == rgb(1).tolist()
    assert figure[:, 20, 6].tolist() == [0, 0, 0]  # 4^2 + 4^2 > radius^2: outside the circle


def test_later_limbs_blend_over_earlier_ones():
    # Limbs 0 (neck-r_shoulder, 2-3) and 1 (neck-l_shoulder, 2-6) overlap at the neck.
    cond = render_pose(keypoints_with({1: (24.0, 24.0), 2: (10.0, 24.0), 5: (38.0, 24.0)}), SIZE)
    first = torch.round(0.4 * rgb(1) + 0.6 * rgb(0))
    second = torch.round(0.4 * first + 0.6 * rgb(1))
    assert (cond[0, :3, 24, 24] * 255).tolist() == second.tolist()


def test_limb_distance_maps():
    cond = render_pose(keypoints_with({1: (10.0, 24.0), 2: (30.0, 24.0)}), SIZE)
    limb = cond[0, 3]
    assert limb[24, 20] == 0 and limb[24, 10] == 0 and limb[20, 20] == 0  # inside the ellipse
    # Below the ellipse (half-width 4 at x = 20): rows 29+ are 1, 2, ... px away; /3 truncated.
    assert limb[24 + 4 + 3, 20] == pytest.approx(1 / 255) and limb[24 + 4 + 2, 20] == 0
    assert torch.equal(cond[0, 4:], torch.ones(16, SIZE, SIZE))  # every other limb is missing


def test_readers_candidate_subset_and_json(tmp_path):
    (tmp_path / "a_candidate.txt").write_text("5 6 0.9 0\n7 8 0.8 1\n9 10 0.7 2\n")
    subset_low = [-1] * 18 + [0.5, 1]
    subset_high = [0, 2] + [-1] * 16 + [2.0, 2]
    rows = (subset_low, subset_high)
    (tmp_path / "a_subset.txt").write_text("\n".join(" ".join(map(str, row)) for row in rows))
    keypoints = read_openpose_candidate_subset(tmp_path / "a_candidate.txt", tmp_path / "a_subset.txt")
    assert keypoints[0].tolist() == pytest.approx([5, 6, 0.9])
    assert keypoints[1].tolist() == pytest.approx([9, 10, 0.7])
    assert (keypoints[2:, 2] == -1).all()

    flat = [0.0] * 54
    flat[3:6] = [11.0, 12.0, 0.5]  # neck
    weaker = [1.0, 1.0, 0.1] + [0.0] * 51
    (tmp_path / "k.json").write_text(json.dumps({"people": [{"pose_keypoints_2d": weaker},
                                                            {"pose_keypoints_2d": flat}]}))  # fmt: skip
    keypoints = read_openpose_json(tmp_path / "k.json")
    assert keypoints[1].tolist() == [11.0, 12.0, 0.5] and keypoints[0, 2] == -1
    body25 = [0.0] * 75
    body25[9 * 3 : 9 * 3 + 3] = [3.0, 4.0, 0.9]  # BODY_25 right hip -> COCO-18 index 8
    (tmp_path / "b.json").write_text(json.dumps({"people": [{"pose_keypoints_2d": body25}]}))
    assert read_openpose_json(tmp_path / "b.json")[8].tolist() == pytest.approx([3.0, 4.0, 0.9])
    (tmp_path / "bad.json").write_text(json.dumps({"people": [{"pose_keypoints_2d": [1, 2, 3]}]}))
    with pytest.raises(MidmsError, match="3 numbers"):
        read_openpose_json(tmp_path / "bad.json")
