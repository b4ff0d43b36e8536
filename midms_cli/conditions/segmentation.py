"""ADE20K-150 label maps as the 151-channel one-hot condition of LSUN-Churches (official loader).

Ids 0..150 map to channels 0..150; the PNG value 255 ("unknown") becomes 150 as in the official
loader. The colour preview uses a palette generated here, NOT the official `color150.mat`.
"""

from __future__ import annotations

import torch

ADE20K_CHANNELS = 151
ADE20K_UNKNOWN = 150  # the id that the PNG value 255 is mapped to by the official loader


def clean_ade20k_labels(labels: torch.Tensor) -> torch.Tensor:
    """255 -> 150 (official loader); any other id outside 0..150 is a ValueError (corrupt label map)."""
    labels = torch.where(labels == 255, torch.full_like(labels, ADE20K_UNKNOWN), labels).long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= ADE20K_CHANNELS):
        bad = labels[(labels < 0) | (labels >= ADE20K_CHANNELS)].unique()[:5].tolist()
        raise ValueError(f"ADE20K label ids must be 0..150 or 255, found {bad}")
    return labels


def one_hot_ade20k(labels: torch.Tensor) -> torch.Tensor:
    """(B, H, W) integer ids -> (B, 151, H, W) float one-hot, channel k = id k."""
    labels = clean_ade20k_labels(labels)
    ids = torch.arange(ADE20K_CHANNELS, device=labels.device).view(1, -1, 1, 1)
    return (labels.unsqueeze(1) == ids).float()


def ade20k_palette() -> torch.Tensor:
    """A fixed, deterministic (151, 3) uint8 palette (id 0 black); NOT the official color150.mat.

    Colours step through hue by the golden ratio with alternating brightness, so neighbouring ids
    get clearly different colours; no random generator is involved.
    """
    ids = torch.arange(1, ADE20K_CHANNELS, dtype=torch.float64)
    hue = (ids * 0.6180339887498949) % 1.0
    value = 0.95 - 0.3 * (ids % 3 == 1).double()
    saturation = 0.85 - 0.35 * (ids % 2 == 0).double()
    # HSV -> RGB, channel k: v - v*s*clamp(min(q, 4 - q), 0, 1) with q = (5, 3, 1)[k] + 6h mod 6.
    offsets = torch.tensor([5.0, 3.0, 1.0], dtype=torch.float64)
    q = (offsets.view(1, 3) + 6.0 * hue.view(-1, 1)) % 6.0
    weight = torch.clamp(torch.minimum(q, 4.0 - q), 0.0, 1.0)
    rgb = value.view(-1, 1) * (1.0 - saturation.view(-1, 1) * weight)
    colours = torch.round(rgb * 255).to(torch.uint8)
    return torch.cat([torch.zeros(1, 3, dtype=torch.uint8), colours])


def colourise_ade20k(labels: torch.Tensor) -> torch.Tensor:
    """(B, H, W) ids or (B, 151, H, W) one-hot -> (B, 3, H, W) preview in [-1, 1]."""
    if labels.dim() == 4:
        labels = labels.argmax(dim=1)
    labels = clean_ade20k_labels(labels)
    palette = ade20k_palette().to(labels.device).float() / 127.5 - 1.0
    return palette[labels].permute(0, 3, 1, 2).contiguous()
