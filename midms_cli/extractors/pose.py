"""OpenPose body keypoints for photos without annotations: inference, peaks, limb grouping.

Reproduces the pytorch-openpose body estimator that CoCosNet ran on DeepFashion: multi-scale
heatmap/PAF inference (boxsize 368, stride 8, pad value 128), Gaussian-smoothed peak finding
(sigma 3, threshold 0.1), PAF line-integral limb scores (10 samples, distance prior, 80 % of samples
above 0.05) and greedy grouping into people. The result is the candidate/subset form of
`midms_cli.conditions.pose.read_openpose_candidate_subset`: candidate rows (x, y, score, id), subset
rows (18 candidate ids or -1, total score, keypoint count). Cao et al., CVPR 2017.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from midms_cli.models.openpose import BodyPoseNet

NUM_KEYPOINTS = 18
BOXSIZE = 368  # the image height the network sees at scale 1.0
STRIDE = 8  # network output stride
PAD_VALUE = 128  # grey padding to a multiple of the stride (on 0..255 BGR)
DEFAULT_SCALES = (0.5, 1.0, 1.5, 2.0)  # OpenPose's multi-scale search
HEATMAP_SIGMA = 3.0  # Gaussian smoothing before peak finding
PEAK_THRESHOLD = 0.1  # thre1
PAF_THRESHOLD = 0.05  # thre2: a limb sample counts when its PAF projection exceeds this
LIMB_SAMPLES = 10  # points sampled along a candidate limb
LIMB_CRITERION = 0.8  # fraction of samples that must pass PAF_THRESHOLD
MIN_PARTS = 4  # people with fewer keypoints are dropped
MIN_MEAN_SCORE = 0.4  # ... as are people whose total score / keypoint count is below this

# The 19 COCO limbs (1-based keypoint pairs): the 17 drawn ones (conditions.pose.LIMBS) + 2 shoulder-ear.
LIMBS_19 = (
    (2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11),
    (2, 12), (12, 13), (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18), (3, 17), (6, 18),
)  # fmt: skip
# The (x, y) PAF channels of each limb in the network's 38-channel output (pytorch-openpose's mapIdx - 19).
PAF_CHANNELS = (
    (12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3), (4, 5),
    (6, 7), (8, 9), (10, 11), (28, 29), (30, 31), (34, 35), (32, 33), (36, 37), (18, 19), (26, 27),
)  # fmt: skip
SEEDING_LIMBS = 17  # only the first 17 limbs may start a new person; the ear links only attach


# --- Inference ---------------------------------------------------------------------------------------------


def openpose_input(images: torch.Tensor) -> torch.Tensor:
    """RGB (B, 3, H, W) in [-1, 1] -> BGR in 0..255, the 8-bit picture OpenPose reads."""
    return ((images.float() + 1) * 127.5).clamp(0, 255).round().flip(1)


def _bicubic(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False)


@torch.no_grad()
def network_maps(
    net: BodyPoseNet,
    bgr: torch.Tensor,
    scales: Sequence[float] = DEFAULT_SCALES,
    boxsize: int = BOXSIZE,
    stride: int = STRIDE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale-averaged (pafs (B, 38, H, W), heatmaps (B, 19, H, W)) at the input's resolution.

    Per scale s: resize the 0..255 BGR picture by s * boxsize / H (bicubic, kept 8-bit), pad right and
    bottom with 128 to a multiple of the stride, feed x / 256 - 0.5, upsample the outputs by the
    stride, crop the padding and resize back to H x W (bicubic).
    """
    height, width = bgr.shape[-2:]
    paf_sum = torch.zeros(bgr.shape[0], 38, height, width, device=bgr.device)
    heat_sum = torch.zeros(bgr.shape[0], 19, height, width, device=bgr.device)
    for scale in scales:
        factor = scale * boxsize / height
        size = (max(1, round(height * factor)), max(1, round(width * factor)))
        resized = _bicubic(bgr, size).clamp(0, 255).round()
        pad_h, pad_w = (-size[0]) % stride, (-size[1]) % stride
        padded = F.pad(resized, (0, pad_w, 0, pad_h), value=PAD_VALUE)
        pafs, heatmaps = net(padded / 256 - 0.5)
        padded_size = (padded.shape[-2], padded.shape[-1])
        for maps, total in ((pafs, paf_sum), (heatmaps, heat_sum)):
            full = _bicubic(maps, padded_size)[..., : size[0], : size[1]]
            total += _bicubic(full, (height, width))
    return paf_sum / len(scales), heat_sum / len(scales)


# --- Peaks -------------------------------------------------------------------------------------------------


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """The normalised 1-D Gaussian of radius int(4 sigma + 0.5) (scipy.ndimage's default truncation)."""
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def _symmetric_index(length: int, radius: int) -> torch.Tensor:
    """Indices padding a line by `radius` with edge-inclusive mirroring (d c b a | a b c d | d c b a)."""
    index = torch.arange(-radius, length + radius)
    period = 2 * length
    index = index % period
    return torch.where(index >= length, period - 1 - index, index)


def gaussian_smooth(maps: torch.Tensor, sigma: float = HEATMAP_SIGMA) -> torch.Tensor:
    """Separable Gaussian blur of (C, H, W) maps with mirrored borders (scipy `gaussian_filter` rule)."""
    kernel = gaussian_kernel(sigma).to(maps)
    radius = kernel.numel() // 2
    c, h, w = maps.shape
    rows = maps[:, _symmetric_index(h, radius)]  # (C, H + 2r, W)
    x = F.conv2d(rows.unsqueeze(1), kernel.view(1, 1, -1, 1))
    cols = x[..., _symmetric_index(w, radius)]
    return F.conv2d(cols, kernel.view(1, 1, 1, -1)).squeeze(1)


def find_peaks(heatmaps: torch.Tensor, threshold: float = PEAK_THRESHOLD, sigma: float = HEATMAP_SIGMA):
    """Per keypoint, the local maxima of the smoothed heatmap above `threshold`.

    heatmaps: (>= 18, H, W) for one image. A pixel is a peak when its smoothed value is >= each of
    its four neighbours (0 outside the map) and > threshold. Returns a list of 18 float64 arrays of
    rows (x, y, score, id), score read from the unsmoothed map, ids running over all keypoints in
    row-major order within each keypoint.
    """
    maps = heatmaps[:NUM_KEYPOINTS].double()
    smooth = gaussian_smooth(maps, sigma)
    padded = F.pad(smooth, (1, 1, 1, 1))
    centre = padded[:, 1:-1, 1:-1]
    is_peak = (
        (centre >= padded[:, 1:-1, :-2])
        & (centre >= padded[:, 1:-1, 2:])
        & (centre >= padded[:, :-2, 1:-1])
        & (centre >= padded[:, 2:, 1:-1])
        & (centre > threshold)
    )
    peaks, next_id = [], 0
    for part in range(NUM_KEYPOINTS):
        ys, xs = torch.nonzero(is_peak[part], as_tuple=True)
        scores = maps[part, ys, xs]
        ids = torch.arange(next_id, next_id + len(xs), dtype=torch.float64)
        peaks.append(torch.stack([xs.double(), ys.double(), scores, ids], dim=1).cpu().numpy().reshape(-1, 4))
        next_id += len(xs)
    return peaks


# --- Limbs -------------------------------------------------------------------------------------------------


def limb_scores(
    start: np.ndarray, end: np.ndarray, paf: np.ndarray, image_height: int
) -> tuple[np.ndarray, np.ndarray]:
    """PAF line integral of every (start i, end j) pair of one limb type.

    start (nA, >=2), end (nB, >=2) pixel positions; paf (2, H, W). Samples 10 points from start to
    end (nearest pixel, half to even), projects the PAF on the unit limb direction, and returns
    (score (nA, nB): mean projection + min(0.5 H / length - 1, 0), valid (nA, nB): more than 80 % of
    samples above 0.05 and score > 0).
    """
    vector = end[None, :, :2] - start[:, None, :2]  # (nA, nB, 2)
    length = np.maximum(np.sqrt((vector**2).sum(-1)), 1e-3)
    unit = vector / length[..., None]
    t = np.linspace(0.0, 1.0, LIMB_SAMPLES)
    points = start[:, None, None, :2] + t[None, None, :, None] * vector[:, :, None, :]  # (nA, nB, S, 2)
    xs = np.clip(np.round(points[..., 0]).astype(int), 0, paf.shape[2] - 1)
    ys = np.clip(np.round(points[..., 1]).astype(int), 0, paf.shape[1] - 1)
    projection = paf[0, ys, xs] * unit[:, :, None, 0] + paf[1, ys, xs] * unit[:, :, None, 1]
    score = projection.mean(-1) + np.minimum(0.5 * image_height / length - 1, 0)
    passing = (projection > PAF_THRESHOLD).sum(-1) > LIMB_CRITERION * LIMB_SAMPLES
    return score, passing & (score > 0)


def connect_limb(start: np.ndarray, end: np.ndarray, paf: np.ndarray, image_height: int) -> np.ndarray:
    """Greedy one-to-one matching of one limb type: (n, 3) rows (start id, end id, limb score).

    Valid pairs are taken in decreasing limb score, skipping any whose start or end is already used.
    """
    if len(start) == 0 or len(end) == 0:
        return np.zeros((0, 3))
    score, valid = limb_scores(start, end, paf, image_height)
    pairs = sorted(zip(*np.nonzero(valid), strict=True), key=lambda ij: -score[ij])
    used_start, used_end, rows = set(), set(), []
    for i, j in pairs:
        if i in used_start or j in used_end:
            continue
        used_start.add(i)
        used_end.add(j)
        rows.append((start[i, 3], end[j, 3], score[i, j]))
        if len(rows) >= min(len(start), len(end)):
            break
    return np.array(rows, dtype=np.float64).reshape(-1, 3)


def group_people(
    peaks: list[np.ndarray], pafs: np.ndarray, image_height: int
) -> tuple[np.ndarray, np.ndarray]:
    """Assemble limbs into people: returns (candidate (N, 4), subset (P, 20)).

    For each limb (A, B) and each of its connections: a person already holding the A or B candidate
    takes the other end; two such people with disjoint keypoints are merged; otherwise (first 17
    limbs only) a new person starts. People with < 4 keypoints or mean score < 0.4 are dropped.
    """
    candidate = np.concatenate(peaks) if peaks else np.zeros((0, 4))
    people: list[np.ndarray] = []
    for k, ((a, b), (cx, cy)) in enumerate(zip(LIMBS_19, PAF_CHANNELS, strict=True)):
        a, b = a - 1, b - 1
        for id_a, id_b, limb_score in connect_limb(peaks[a], peaks[b], pafs[[cx, cy]], image_height):
            owners = [p for p in people if p[a] == id_a or p[b] == id_b][:2]
            if len(owners) == 2 and not ((owners[0][:-2] >= 0) & (owners[1][:-2] >= 0)).any():
                first, second = owners
                first[:-2] += second[:-2] + 1  # -1 + (id + 1) copies the other person's ids
                first[-2:] += second[-2:]
                first[-2] += limb_score
                people = [p for p in people if p is not second]
            elif owners:
                person = owners[0]
                if person[b] != id_b:
                    person[b] = id_b
                    person[-1] += 1
                    person[-2] += candidate[int(id_b), 2] + limb_score
            elif k < SEEDING_LIMBS:
                person = np.full(NUM_KEYPOINTS + 2, -1.0)
                person[a], person[b] = id_a, id_b
                person[-1] = 2
                person[-2] = candidate[int(id_a), 2] + candidate[int(id_b), 2] + limb_score
                people.append(person)
    kept = [p for p in people if p[-1] >= MIN_PARTS and p[-2] / p[-1] >= MIN_MEAN_SCORE]
    subset = np.stack(kept) if kept else np.zeros((0, NUM_KEYPOINTS + 2))
    return candidate, subset


def people_keypoints(candidate: np.ndarray, subset: np.ndarray) -> torch.Tensor:
    """(P, 18, 3) keypoints [x, y, score] per person, score -1 where missing."""
    keypoints = torch.full((len(subset), NUM_KEYPOINTS, 3), -1.0)
    for p, person in enumerate(subset):
        for part, index in enumerate(person[:NUM_KEYPOINTS].astype(int)):
            if index >= 0:
                x, y, score = candidate[index, :3]
                keypoints[p, part] = torch.tensor([x, y, max(score, 0.0)])
    return keypoints


def best_person(candidate: np.ndarray, subset: np.ndarray) -> torch.Tensor:
    """(18, 3) keypoints of the person with the highest total score (all missing when nobody is found)."""
    if len(subset) == 0:
        return torch.full((NUM_KEYPOINTS, 3), -1.0)
    return people_keypoints(candidate, subset[[int(np.argmax(subset[:, NUM_KEYPOINTS]))]])[0]


# --- End to end --------------------------------------------------------------------------------------------


def estimate_people(
    net: BodyPoseNet, images: torch.Tensor, scales: Sequence[float] = DEFAULT_SCALES
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(candidate, subset) of every image of a batch (B, 3, H, W) in [-1, 1]."""
    device = next(net.parameters()).device
    pafs, heatmaps = network_maps(net, openpose_input(images.to(device)), scales)
    height = images.shape[-2]
    results = []
    for paf, heat in zip(pafs, heatmaps, strict=True):
        peaks = find_peaks(heat)
        results.append(group_people(peaks, paf.double().cpu().numpy(), height))
    return results


def keypoints_from_network(
    net: BodyPoseNet, images: torch.Tensor, scales: Sequence[float] = DEFAULT_SCALES
) -> torch.Tensor:
    """(B, 18, 3) keypoints [x, y, score] in input pixels of the highest-scoring person per image."""
    return torch.stack([best_person(c, s) for c, s in estimate_people(net, images, scales)])
