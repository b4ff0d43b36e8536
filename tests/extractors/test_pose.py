"""OpenPose body extractor: network layout, preprocessing, peaks, limb grouping, registry errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from midms_cli.conditions.pose import LIMBS, render_pose
from midms_cli.errors import MidmsError
from midms_cli.extractors import extract_keypoints, get_extractor
from midms_cli.extractors.loading import load_published
from midms_cli.extractors.pose import (
    LIMBS_19,
    PAF_CHANNELS,
    best_person,
    find_peaks,
    gaussian_smooth,
    group_people,
    network_maps,
    people_keypoints,
)
from midms_cli.models.openpose import BodyPoseNet


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIDMS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "home"


def published_openpose_shapes() -> dict[str, tuple[int, ...]]:
    """The key/shape table of pytorch-openpose's body_pose_model.pth, written out independently."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, cin, cout, k):
        shapes[f"{name}.weight"] = (cout, cin, k, k)
        shapes[f"{name}.bias"] = (cout,)

    vgg = [("conv1_1", 3, 64), ("conv1_2", 64, 64), ("conv2_1", 64, 128), ("conv2_2", 128, 128)]
    vgg += [("conv3_1", 128, 256)] + [(f"conv3_{i}", 256, 256) for i in (2, 3, 4)]
    vgg += [
        ("conv4_1", 256, 512),
        ("conv4_2", 512, 512),
        ("conv4_3_CPM", 512, 256),
        ("conv4_4_CPM", 256, 128),
    ]
    for name, cin, cout in vgg:
        conv(name, cin, cout, 3)
    for branch, out in ((1, 38), (2, 19)):
        conv(f"conv5_1_CPM_L{branch}", 128, 128, 3)
        conv(f"conv5_2_CPM_L{branch}", 128, 128, 3)
        conv(f"conv5_3_CPM_L{branch}", 128, 128, 3)
        conv(f"conv5_4_CPM_L{branch}", 128, 512, 1)
        conv(f"conv5_5_CPM_L{branch}", 512, out, 1)
        for stage in range(2, 7):
            conv(f"Mconv1_stage{stage}_L{branch}", 185, 128, 7)
            for i in range(2, 6):
                conv(f"Mconv{i}_stage{stage}_L{branch}", 128, 128, 7)
            conv(f"Mconv6_stage{stage}_L{branch}", 128, 128, 1)
            conv(f"Mconv7_stage{stage}_L{branch}", 128, out, 1)
    return shapes


# --- Network -----------------------------------------------------------------------------------------------


def test_network_has_the_published_keys_shapes_and_parameter_count():
    with torch.device("meta"):
        net = BodyPoseNet()
    state = {key: tuple(value.shape) for key, value in net.state_dict().items()}
    assert state == published_openpose_shapes()
    assert sum(p.numel() for p in net.parameters()) == 52_311_446  # the published ~52.3 M


def test_wrong_or_missing_key_is_a_one_line_error_naming_it():
    with torch.device("meta"):
        net = BodyPoseNet()
    tensors = {k: torch.empty(v, device="meta") for k, v in published_openpose_shapes().items()}
    missing = dict(tensors)
    del missing["Mconv3_stage4_L2.weight"]
    with pytest.raises(
        MidmsError, match=r"lack key 'Mconv3_stage4_L2.weight'.*midms weights add openpose-body"
    ):
        load_published(net, missing, "openpose-body")
    renamed = dict(tensors)
    renamed["model0.conv1_1.weight"] = renamed.pop("conv1_1.weight")
    with pytest.raises(MidmsError, match="lack key 'conv1_1.weight'"):
        load_published(net, renamed, "openpose-body")
    extra = {**tensors, "conv9.weight": torch.empty(1, device="meta")}
    with pytest.raises(MidmsError, match="unexpected key 'conv9.weight'"):
        load_published(net, extra, "openpose-body")
    reshaped = {**tensors, "conv5_5_CPM_L2.weight": torch.empty(18, 512, 1, 1, device="meta")}
    with pytest.raises(MidmsError, match=r"'conv5_5_CPM_L2.weight' has shape \(18, 512, 1, 1\)") as info:
        load_published(net, reshaped, "openpose-body")
    assert "\n" not in str(info.value)


class ConstantNet(nn.Module):
    """A stride-8 stand-in for BodyPoseNet that records its input and returns constant maps."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x)
        b, _, h, w = x.shape
        return torch.full((b, 38, h // 8, w // 8), 0.25), torch.full((b, 19, h // 8, w // 8), 0.5)


def test_network_maps_preprocess_pad_and_average_over_scales():
    net = ConstantNet()
    bgr = torch.zeros(1, 3, 46, 30)
    bgr[:, 0] = 255  # blue channel
    pafs, heatmaps = network_maps(net, bgr, scales=(1.0, 0.5), boxsize=46)
    assert pafs.shape == (1, 38, 46, 30) and heatmaps.shape == (1, 19, 46, 30)
    torch.testing.assert_close(pafs, torch.full_like(pafs, 0.25))
    torch.testing.assert_close(heatmaps, torch.full_like(heatmaps, 0.5))
    full, half = net.inputs
    assert full.shape[-2:] == (48, 32) and half.shape[-2:] == (24, 16)  # padded to multiples of 8
    torch.testing.assert_close(full[0, :, 0, 0], torch.tensor([255 / 256 - 0.5, -0.5, -0.5]))
    torch.testing.assert_close(full[0, :, 47, 31], torch.zeros(3))  # padding value 128 -> 128/256 - 0.5


# --- Peaks -------------------------------------------------------------------------------------------------


def symmetric_gaussian_reference(image: np.ndarray, sigma: float) -> np.ndarray:
    """Direct 2-D convolution with a truncated Gaussian and edge-inclusive mirrored borders."""
    radius = int(4 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    padded = np.pad(image, radius, mode="symmetric")
    out = np.zeros_like(image)
    for dy, wy in zip(offsets, weights, strict=True):
        for dx, wx in zip(offsets, weights, strict=True):
            out += (
                wy
                * wx
                * padded[
                    radius + dy : radius + dy + image.shape[0], radius + dx : radius + dx + image.shape[1]
                ]
            )
    return out


def test_gaussian_smoothing_matches_a_direct_convolution_with_mirrored_borders():
    torch.manual_seed(0)
    maps = torch.rand(2, 9, 14, dtype=torch.float64)
    smoothed = gaussian_smooth(maps, sigma=1.5)
    for c in range(2):
        np.testing.assert_allclose(
            smoothed[c].numpy(), symmetric_gaussian_reference(maps[c].numpy(), 1.5), atol=1e-12
        )


def bump(height, width, x, y, amplitude=1.0, sigma=1.5):
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return amplitude * torch.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2))


def test_peaks_are_local_maxima_above_threshold_with_running_ids():
    heat = torch.zeros(19, 40, 50, dtype=torch.float64)
    heat[0] = bump(40, 50, 10, 12) + bump(40, 50, 35, 30, amplitude=0.9)
    heat[3] = bump(40, 50, 20, 5)
    heat[5] = bump(40, 50, 20, 20, amplitude=0.05)  # below the 0.1 threshold even before smoothing
    peaks = find_peaks(heat)
    assert len(peaks) == 18
    np.testing.assert_array_equal(peaks[0][:, [0, 1, 3]], [[10, 12, 0], [35, 30, 1]])
    np.testing.assert_allclose(peaks[0][:, 2], [1.0, 0.9])  # scores from the unsmoothed map
    np.testing.assert_array_equal(peaks[3][:, [0, 1, 3]], [[20, 5, 2]])
    assert all(len(peaks[k]) == 0 for k in range(18) if k not in (0, 3))


# --- Limb grouping -----------------------------------------------------------------------------------------


def skeleton(left: int, top: int) -> np.ndarray:
    """18 (x, y) joints of an upright person whose nose is at (left + 10, top)."""
    cx = left + 10
    return np.array([
        (cx, top), (cx, top + 8),  # nose, neck
        (cx - 7, top + 9), (cx - 9, top + 18), (cx - 10, top + 27),  # right arm
        (cx + 7, top + 9), (cx + 9, top + 18), (cx + 10, top + 27),  # left arm
        (cx - 4, top + 28), (cx - 5, top + 40), (cx - 5, top + 52),  # right leg
        (cx + 4, top + 28), (cx + 5, top + 40), (cx + 5, top + 52),  # left leg
        (cx - 2, top - 2), (cx + 2, top - 2), (cx - 4, top - 1), (cx + 4, top - 1),  # eyes, ears
    ], dtype=np.float64)  # fmt: skip


def paint_people(people: list[np.ndarray], amplitudes: list[float], height: int, width: int):
    """Heatmaps with a bump per joint and PAFs holding the unit limb vector within 1 px of each limb."""
    heat = torch.zeros(19, height, width, dtype=torch.float64)
    paf = torch.zeros(38, height, width, dtype=torch.float64)
    grid = torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64)
    ys, xs = torch.meshgrid(*grid, indexing="ij")
    for joints, amplitude in zip(people, amplitudes, strict=True):
        for k, (x, y) in enumerate(joints):
            heat[k] = torch.maximum(heat[k], bump(height, width, x, y, amplitude))
        for (a, b), (cx, cy) in zip(LIMBS_19, PAF_CHANNELS, strict=True):
            start, end = joints[a - 1], joints[b - 1]
            direction = (end - start) / np.linalg.norm(end - start)
            t = ((xs - start[0]) * direction[0] + (ys - start[1]) * direction[1]).clamp(
                0, np.linalg.norm(end - start)
            )
            distance = torch.hypot(xs - (start[0] + t * direction[0]), ys - (start[1] + t * direction[1]))
            near = distance <= 1.0
            paf[cx][near], paf[cy][near] = direction[0], direction[1]
    return heat, paf


def test_grouping_recovers_two_skeletons_exactly_and_keeps_the_stronger_person():
    # Joints stay > 10 px from the border: mirrored smoothing pulls a peak next to the edge towards it.
    first, second = skeleton(12, 14), skeleton(48, 16)
    heat, paf = paint_people([first, second], [0.9, 1.0], height=84, width=84)
    candidate, subset = group_people(find_peaks(heat), paf.numpy(), image_height=84)
    assert candidate.shape == (36, 4) and subset.shape == (2, 20)
    people = people_keypoints(candidate, subset)
    found = sorted(people.tolist(), key=lambda person: person[0][0])
    for person, expected, amplitude in zip(found, (first, second), (0.9, 1.0), strict=True):
        np.testing.assert_array_equal(np.array(person)[:, :2], expected)
        np.testing.assert_allclose(np.array(person)[:, 2], amplitude)
    assert (subset[:, 19] == 18).all()
    best = best_person(candidate, subset)
    np.testing.assert_array_equal(best[:, :2].numpy(), second)  # higher total score


def test_limbs_without_paf_support_cut_the_skeleton_and_small_fragments_are_dropped():
    first = skeleton(12, 14)
    heat, paf = paint_people([first], [1.0], height=84, width=48)
    paf[[28, 29, 30, 31, 34, 35, 32, 33, 36, 37, 18, 19, 26, 27]] = 0  # every limb touching the head
    paf[[12, 13]] = 0  # neck - right shoulder: the right arm becomes a 3-joint fragment (< 4: dropped)
    candidate, subset = group_people(find_peaks(heat), paf.numpy(), image_height=84)
    assert len(subset) == 1
    keypoints = best_person(candidate, subset)
    missing = [0, 2, 3, 4, 14, 15, 16, 17]
    assert (keypoints[missing, 2] == -1).all()
    kept = [k for k in range(18) if k not in missing]
    np.testing.assert_array_equal(keypoints[kept, :2].numpy(), first[kept])


def test_no_person_gives_all_missing_keypoints():
    candidate, subset = group_people(find_peaks(torch.zeros(19, 16, 16)), np.zeros((38, 16, 16)), 16)
    assert subset.shape == (0, 20)
    assert (best_person(candidate, subset)[:, 2] == -1).all()


def test_limb_tables_agree_with_the_renderer():
    assert LIMBS_19[:17] == LIMBS
    flat = sorted(c for pair in PAF_CHANNELS for c in pair)
    assert flat == list(range(38)) and all(y == x + 1 and x % 2 == 0 for x, y in PAF_CHANNELS)


# --- Registry ----------------------------------------------------------------------------------------------


def test_missing_weights_fail_before_any_work_naming_the_add_command():
    with pytest.raises(MidmsError, match="midms weights add openpose-body FILE") as info:
        get_extractor("openpose")
    assert "\n" not in str(info.value)
    with pytest.raises(MidmsError, match="midms weights add openpose-body FILE"):
        extract_keypoints(torch.zeros(1, 3, 8, 8))
    with pytest.raises(MidmsError, match="extractable kinds: openpose, ade20k, canny"):
        get_extractor("celebahq-edges")
    with pytest.raises(MidmsError, match="no option 'mode'"):
        get_extractor("openpose", mode="slide")


def test_published_file_loads_strictly_and_extracts_a_condition(tmp_path):
    from midms_cli.weights import add_weight

    # Zero weights in the published layout: the maps are empty, so nobody is found.
    tensors = {k: torch.zeros(v) for k, v in published_openpose_shapes().items()}
    torch.save(tensors, tmp_path / "body_pose_model.pth")
    add_weight("openpose-body", tmp_path / "body_pose_model.pth")
    extractor = get_extractor("openpose", scales=(0.1,))
    condition = extractor(torch.zeros(1, 3, 48, 40))
    assert condition.shape == (1, 20, 48, 40)
    torch.testing.assert_close(condition, render_pose(torch.full((1, 18, 3), -1.0), (48, 40)))
    assert extractor.metadata["estimator"] == "openpose-body-coco18"
    assert extractor.metadata["weight_source"] == "body_pose_model.pth"
