"""ADE20K-150 label maps for photos without annotations, from the Swin-S UperNet segmenter.

Follows mmsegmentation's ADE20K test pipeline for the published checkpoint: resize so the short
side is 512 (long side at most 2048, aspect kept), normalise RGB 0..255 with the ImageNet mean/std,
infer on the whole image (the config's mode) or in 512 x 512 windows with stride 341 (averaging
overlaps), resize the logits back to the photo and take the argmax.

Label convention: the network predicts classes 0..149; we store class + 1, so ids are 1..150 and 0 is
"other/unknown" as in ADE20K's own annotation PNGs. The official LSUN code's segmentation loss treats
class 0 as unknown, which this convention makes true (the authors' exact convention is [UNCERTAIN]).
These ids are what `midms_cli.conditions.segmentation.one_hot_ade20k` and the lsun-churches plugin read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from midms_cli.models.swin_upernet import ADE20K_MEAN, ADE20K_STD, SwinUperNet

SHORT_SIDE = 512  # the checkpoint's training/test resolution (512x512 crops, test scale (2048, 512))
LONG_SIDE_LIMIT = 2048
CROP = 512  # sliding-window size and stride of mmseg's "slide" test mode
CROP_STRIDE = 341
MODES = ("whole", "slide")
LABEL_OFFSET = 1  # stored id = predicted class + 1 (0 = unknown)


def ade20k_normalise(images: torch.Tensor) -> torch.Tensor:
    """RGB (B, 3, H, W) in [-1, 1] -> 0..255 -> (x - mean) / std, mmseg's img_norm_cfg."""
    x = (images.float() + 1) * 127.5
    mean = torch.tensor(ADE20K_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(ADE20K_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def inference_size(height: int, width: int, short_side: int = SHORT_SIDE, long_limit: int = LONG_SIDE_LIMIT):
    """mmcv's keep-ratio rescale: factor min(long_limit / long, short_side / short), sizes rounded."""
    factor = min(long_limit / max(height, width), short_side / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def whole_logits(net: SwinUperNet, x: torch.Tensor) -> torch.Tensor:
    """(B, 150, H, W) logits of a normalised image, the head's stride-4 output resized to H x W."""
    return _resize(net(x), x.shape[-2:])


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """mmseg's slide grid on one axis: ceil((length - crop) / stride) + 1 starts, the last flush."""
    count = max(length - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride + crop, length) - crop, 0) for i in range(count)]


def slide_logits(
    net: SwinUperNet, x: torch.Tensor, crop: int = CROP, stride: int = CROP_STRIDE
) -> torch.Tensor:
    """(B, 150, H, W) logits averaged over crop x crop windows (smaller when the image is smaller)."""
    height, width = x.shape[-2:]
    total = torch.zeros(x.shape[0], net.cfg.num_classes, height, width, device=x.device)
    count = torch.zeros(1, 1, height, width, device=x.device)
    for top in window_starts(height, crop, stride):
        for left in window_starts(width, crop, stride):
            bottom, right = min(top + crop, height), min(left + crop, width)
            total[..., top:bottom, left:right] += whole_logits(net, x[..., top:bottom, left:right])
            count[..., top:bottom, left:right] += 1
    return total / count


@torch.no_grad()
def segment(
    net: SwinUperNet,
    images: torch.Tensor,
    mode: str = "whole",
    short_side: int = SHORT_SIDE,
    crop: int = CROP,
    stride: int = CROP_STRIDE,
) -> torch.Tensor:
    """Photos (B, 3, H, W) in [-1, 1] -> (B, H, W) long predicted classes 0..149 at the photo's size."""
    if mode not in MODES:
        raise ValueError(f"segmentation mode must be one of {MODES}, got {mode!r}")
    device = next(net.parameters()).device
    height, width = images.shape[-2:]
    x = _resize(ade20k_normalise(images.to(device)), inference_size(height, width, short_side))
    logits = whole_logits(net, x) if mode == "whole" else slide_logits(net, x, crop, stride)
    return _resize(logits, (height, width)).argmax(dim=1)


def labels_from_network(
    net: SwinUperNet, images: torch.Tensor, mode: str = "whole", **options
) -> torch.Tensor:
    """(B, H, W) long label ids 1..150 in the stored convention (class + 1; 0 = unknown, never predicted)."""
    return segment(net, images, mode, **options) + LABEL_OFFSET
