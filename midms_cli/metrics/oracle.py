"""Oracle errors on synthfaces: the synthetic plugin knows the true translation of every pair.

PSNR and L1 between a prediction (the output, or the initial warp) and the oracle image, over the
whole image and, when part masks are given, per part region. Images come in [-1, 1]; both numbers
are computed on the [0, 1] scale, so PSNR = 10 log10(1 / MSE) and L1 is a mean absolute error in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

PSNR_CAP = 100.0  # dB reported for a perfect match, where 10 log10(1/0) would be infinite


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    return (images.to(torch.float64) + 1) / 2


def masked_errors(
    prediction: torch.Tensor, oracle: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image sums of squared and absolute errors over a region, and its pixel count.

    prediction, oracle: (B, 3, H, W) in [-1, 1]; mask: (B, 1, H, W) bool or None (whole image).
    Returns (squared_sum, absolute_sum, count), each (B,), counting colour values.
    """
    difference = _to_unit(prediction) - _to_unit(oracle)
    weight = torch.ones_like(difference[:, :1]) if mask is None else mask.to(difference)
    squared = (difference.square() * weight).sum(dim=(1, 2, 3))
    absolute = (difference.abs() * weight).sum(dim=(1, 2, 3))
    count = weight.sum(dim=(1, 2, 3)) * difference.shape[1]
    return squared, absolute, count


def psnr_from_mse(mse: float) -> float:
    """10 log10(1 / MSE) for images in [0, 1], capped at PSNR_CAP for MSE = 0."""
    return PSNR_CAP if mse <= 10 ** (-PSNR_CAP / 10) else -10 * math.log10(mse)


def psnr(prediction: torch.Tensor, oracle: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (B,) in dB of images in [-1, 1] (computed on [0, 1])."""
    squared, _, count = masked_errors(prediction, oracle)
    return torch.tensor([psnr_from_mse(float(m)) for m in squared / count], dtype=torch.float64)


class OracleAccumulator:
    """Running region-wise errors of one prediction kind against the oracle, batch by batch.

    PSNR per image is averaged over images (the usual reporting); L1 is a mean over images of each
    image's mean absolute error. Parts absent from an image (empty mask) are skipped for that image.
    """

    def __init__(self, part_names: Sequence[str] = ()) -> None:
        self.part_names = list(part_names)
        self.sums: dict[str, list[float]] = {}  # region -> [psnr_sum, l1_sum, images]

    def _add(self, region: str, squared: torch.Tensor, absolute: torch.Tensor, count: torch.Tensor) -> None:
        totals = self.sums.setdefault(region, [0.0, 0.0, 0])
        for sq, ab, n in zip(squared.tolist(), absolute.tolist(), count.tolist(), strict=True):
            if n <= 0:
                continue
            totals[0] += psnr_from_mse(sq / n)
            totals[1] += ab / n
            totals[2] += 1

    def add(
        self, prediction: torch.Tensor, oracle: torch.Tensor, part_masks: torch.Tensor | None = None
    ) -> None:
        """Add a batch; part_masks (B, P, H, W) bool in the order of `part_names`, or None."""
        self._add("image", *masked_errors(prediction, oracle))
        if part_masks is None:
            return
        if part_masks.shape[1] != len(self.part_names):
            raise ValueError(f"got {part_masks.shape[1]} part masks for {len(self.part_names)} part names")
        for index, name in enumerate(self.part_names):
            self._add(name, *masked_errors(prediction, oracle, part_masks[:, index : index + 1]))

    def result(self, prefix: str) -> dict[str, float]:
        """{"<prefix>_psnr": ..., "<prefix>_l1": ..., "<prefix>_psnr_<part>": ...}."""
        out = {}
        for region, (psnr_sum, l1_sum, images) in self.sums.items():
            if images == 0:
                continue
            suffix = "" if region == "image" else f"_{region}"
            out[f"{prefix}_psnr{suffix}"] = psnr_sum / images
            out[f"{prefix}_l1{suffix}"] = l1_sum / images
        return out


def part_mean_colours(
    images: torch.Tensor, labels: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean colour of every labelled region: images (B, 3, H, W) in [-1, 1], labels (B, H, W) ids in
    [0, count). Returns colours (B, count, 3) on the [0, 1] scale and pixel counts (B, count)."""
    one_hot = torch.nn.functional.one_hot(labels.long(), count).to(torch.float64)  # (B, H, W, count)
    pixels = one_hot.sum(dim=(1, 2))  # (B, count)
    sums = torch.einsum("bchw,bhwk->bkc", _to_unit(images), one_hot)
    return sums / pixels.clamp(min=1).unsqueeze(-1), pixels


class PartColourAccumulator:
    """Appearance transfer, measured directly: for every labelled region of the condition's geometry
    (background, skin, hair, ...), the Euclidean distance between the output's mean RGB colour and the
    oracle's over that region, on the [0, 1] scale. Averaged over the regions present in an image, then
    over images; and per region over the images that have it."""

    def __init__(self, label_names: Sequence[str]) -> None:
        self.label_names = list(label_names)
        self.image_sum, self.images = 0.0, 0
        self.region_sums = [0.0] * len(self.label_names)
        self.region_counts = [0] * len(self.label_names)

    def add(self, prediction: torch.Tensor, oracle: torch.Tensor, labels: torch.Tensor) -> None:
        """prediction, oracle (B, 3, H, W) in [-1, 1]; labels (B, H, W) of the oracle's geometry."""
        count = len(self.label_names)
        predicted, present = part_mean_colours(prediction, labels, count)
        expected, _ = part_mean_colours(oracle, labels, count)
        distance = (predicted - expected).norm(dim=-1)  # (B, count)
        has = present > 0
        for b in range(distance.shape[0]):
            self.image_sum += float(distance[b][has[b]].mean())
            self.images += 1
        for k in range(count):
            self.region_sums[k] += float(distance[:, k][has[:, k]].sum())
            self.region_counts[k] += int(has[:, k].sum())

    def result(self, prefix: str = "part_colour_error") -> dict[str, float]:
        """{"<prefix>": mean over images, "<prefix>_<region>": mean over the images with that region}."""
        if self.images == 0:
            return {}
        out = {prefix: self.image_sum / self.images}
        for name, total, n in zip(self.label_names, self.region_sums, self.region_counts, strict=True):
            if n:
                out[f"{prefix}_{name}"] = total / n
        return out
