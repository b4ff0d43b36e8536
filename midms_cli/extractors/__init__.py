"""Condition extractors: compute a condition from a bare photo when a dataset has no annotations.

One registry maps a condition kind (midms_cli.conditions.CONDITIONS) to the estimator behind it:
`openpose` -> OpenPose body keypoints, `ade20k` -> Swin-S UperNet segmentation,
`canny` -> kornia Canny edges. `get_extractor(kind)` checks that the estimator's weights are present
BEFORE any work and returns a callable photo batch -> condition tensor, as `midms prepare ... --extract`
and `midms translate --extract` need.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from midms_cli.errors import MidmsError

OPENPOSE_WEIGHT = "openpose-body"
SEGMENTER_WEIGHT = "swin-s-ade20k"


@dataclass(frozen=True)
class ExtractorSpec:
    """A condition kind that can be computed from a photo, the weights it needs and the estimator's name."""

    kind: str
    weight: str | None
    estimator: str  # recorded in metadata so extracted conditions are never mistaken for annotations
    description: str
    options: tuple[str, ...] = ()  # keyword options `get_extractor` accepts for this kind


EXTRACTORS: dict[str, ExtractorSpec] = {
    spec.kind: spec
    for spec in (
        ExtractorSpec(
            "openpose", OPENPOSE_WEIGHT, "openpose-body-coco18",
            "OpenPose body keypoints (multi-scale, PAF grouping; best person) -> stick figure + limb maps",
            ("scales",),
        ),
        ExtractorSpec(
            "ade20k", SEGMENTER_WEIGHT, "upernet-swin-s-ade20k",
            "Swin-S UperNet ADE20K-150 segmentation (ids = class + 1) -> 151-channel one-hot",
            ("mode",),
        ),
        ExtractorSpec("canny", None, "kornia-canny", "Canny edges of the grayscale photo"),
    )
}  # fmt: skip


@dataclass
class Extractor:
    """A ready estimator: `extractor(images (B, 3, H, W) in [-1, 1]) -> condition (B, C, H, W) in [0, 1]`."""

    spec: ExtractorSpec
    run: Callable[[torch.Tensor], torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.run(images)


def extractor_spec(kind: str) -> ExtractorSpec:
    """The registered extractor of `kind`, or a user error listing the kinds that can be extracted."""
    if kind not in EXTRACTORS:
        raise MidmsError(
            f"no extractor for condition kind {kind!r}; extractable kinds: {', '.join(EXTRACTORS)}"
        )
    return EXTRACTORS[kind]


def _device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    from midms_cli.devices import resolve_device

    return resolve_device(device)


# --- Networks ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _cached_network(weight: str, path: str, stamp: int, device: str) -> torch.nn.Module:
    """The network of `weight` loaded from `path` (stamp = file mtime, so a re-added file reloads)."""
    from safetensors.torch import load_file

    from midms_cli.extractors.loading import load_published

    tensors = load_file(path)
    if weight == OPENPOSE_WEIGHT:
        from midms_cli.models.openpose import BodyPoseNet

        net = load_published(BodyPoseNet(), tensors, weight)
    else:
        from midms_cli.models.swin_upernet import SwinUperNet, derived_keys

        model = SwinUperNet()
        net = load_published(model, tensors, weight, derived_keys(model))
    return net.to(torch.device(device)).eval()


def load_network(weight: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The stored `openpose-body` or `swin-s-ade20k` network on `device` (cached per process).

    Missing weights raise a one-line MidmsError naming `midms weights add NAME FILE`.
    """
    from midms_cli.weights import require_weight

    path = require_weight(weight)
    return _cached_network(weight, str(path), path.stat().st_mtime_ns, str(_device(device)))


# --- The two extraction functions -------------------------------------------------------------------------


def extract_keypoints(
    images: torch.Tensor,
    device: str | torch.device = "cpu",
    *,
    scales: Sequence[float] | None = None,
    net: torch.nn.Module | None = None,
) -> torch.Tensor:
    """OpenPose COCO-18 keypoints of photos (B, 3, H, W) in [-1, 1] -> (B, 18, 3) [x, y, score] in pixels.

    The highest-scoring person of each image is kept; a missing keypoint has score -1 (the input of
    `midms_cli.conditions.pose.render_pose`). `scales` defaults to OpenPose's (0.5, 1.0, 1.5, 2.0).
    """
    from midms_cli.extractors.pose import DEFAULT_SCALES, keypoints_from_network

    net = net if net is not None else load_network(OPENPOSE_WEIGHT, device)
    return keypoints_from_network(net, images, tuple(scales or DEFAULT_SCALES))


def extract_segmentation(
    images: torch.Tensor,
    device: str | torch.device = "cpu",
    *,
    mode: str = "whole",
    net: torch.nn.Module | None = None,
) -> torch.Tensor:
    """ADE20K label maps of photos (B, 3, H, W) in [-1, 1] -> (B, H, W) long ids in 0..150.

    Ids are predicted class + 1 (1..150; 0 = unknown is never predicted), the convention of
    ADE20K's annotation PNGs; see `midms_cli.extractors.segment`. mode: "whole" or "slide".
    """
    from midms_cli.extractors.segment import MODES, labels_from_network

    if mode not in MODES:
        raise MidmsError(f"unknown segmentation mode {mode!r}; use one of {', '.join(MODES)}")
    net = net if net is not None else load_network(SEGMENTER_WEIGHT, device)
    return labels_from_network(net, images, mode)


# --- The registry entry point -----------------------------------------------------------------------------


def _weight_metadata(weight: str) -> dict[str, Any]:
    from midms_cli.weights import weight_metadata

    stored = weight_metadata(weight)
    return {
        "weight": weight,
        "weight_source": stored.get("source_file"),
        "weight_sha256": stored.get("source_sha256"),
    }


def get_extractor(kind: str, device: str | torch.device = "cpu", **options: Any) -> Extractor:
    """A ready extractor for condition `kind`; raises MidmsError at once when its weights are missing.

    options: `scales` (openpose), `mode` (ade20k: "whole" or "slide"). The returned callable maps
    photos (B, 3, H, W) in [-1, 1] to the condition tensor of CONDITIONS[kind].
    """
    spec = extractor_spec(kind)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise MidmsError(
            f"extractor {kind!r} has no option {unknown[0]!r}; "
            f"it accepts: {', '.join(spec.options) or 'none'}"
        )
    if options.get("mode", "whole") not in ("whole", "slide"):
        raise MidmsError(f"unknown segmentation mode {options['mode']!r}; use whole or slide")
    device = _device(device)
    metadata: dict[str, Any] = {"estimator": spec.estimator, "extracted": True, **options}
    if spec.kind == "canny":
        from midms_cli.conditions.canny import canny_edges

        return Extractor(spec, lambda images: canny_edges(images.to(device)).cpu(), metadata)

    net = load_network(spec.weight, device)  # fails here, before any work, when weights are missing
    metadata.update(_weight_metadata(spec.weight))
    if spec.kind == "openpose":
        from midms_cli.conditions.pose import render_pose

        scales = options.get("scales")

        def run(images: torch.Tensor) -> torch.Tensor:
            keypoints = extract_keypoints(images, device, scales=scales, net=net)
            return render_pose(keypoints, tuple(images.shape[-2:]))

        return Extractor(spec, run, metadata)

    from midms_cli.conditions.segmentation import one_hot_ade20k

    mode = options.get("mode", "whole")

    def run_segmentation(images: torch.Tensor) -> torch.Tensor:
        return one_hot_ade20k(extract_segmentation(images, device, mode=mode, net=net).cpu())

    return Extractor(spec, run_segmentation, metadata)
