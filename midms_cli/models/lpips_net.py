"""LPIPS networks (Zhang et al. 2018, v0.1): an ImageNet backbone plus learned 1x1 linear heads.

Backbones are torchvision's AlexNet and VGG16 `features` stacks (keys `features.N.weight`), tapped
after the ReLUs LPIPS uses; the heads follow the published v0.1 files (`lin<k>.model.1.weight`,
shape (1, C_k, 1, 1), no bias; `model.0` is a parameter-free dropout).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from midms_cli.errors import MidmsError

# LPIPS' ScalingLayer constants: inputs in [-1, 1] are shifted and scaled to ImageNet statistics.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)

# (torchvision features index, in, out, kernel, stride, padding) of each conv, and the features
# index after whose ReLU each LPIPS tap is read ("M" entries are 3x3 or 2x2 max pools).
ALEXNET_LAYERS: tuple = (
    (0, 3, 64, 11, 4, 2),
    "M3",
    (3, 64, 192, 5, 1, 2),
    "M3",
    (6, 192, 384, 3, 1, 1),
    (8, 384, 256, 3, 1, 1),
    (10, 256, 256, 3, 1, 1),
)
ALEXNET_TAPS = (0, 3, 6, 8, 10)  # relu1 ... relu5
VGG16_LAYERS: tuple = (
    (0, 3, 64, 3, 1, 1),
    (2, 64, 64, 3, 1, 1),
    "M2",
    (5, 64, 128, 3, 1, 1),
    (7, 128, 128, 3, 1, 1),
    "M2",
    (10, 128, 256, 3, 1, 1),
    (12, 256, 256, 3, 1, 1),
    (14, 256, 256, 3, 1, 1),
    "M2",
    (17, 256, 512, 3, 1, 1),
    (19, 512, 512, 3, 1, 1),
    (21, 512, 512, 3, 1, 1),
    "M2",
    (24, 512, 512, 3, 1, 1),
    (26, 512, 512, 3, 1, 1),
    (28, 512, 512, 3, 1, 1),
)
VGG16_TAPS = (2, 7, 14, 21, 28)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
BACKBONES = {"alex": (ALEXNET_LAYERS, ALEXNET_TAPS), "vgg": (VGG16_LAYERS, VGG16_TAPS)}


class Backbone(nn.Module):
    """A torchvision `features` stack returning the ReLU outputs at the LPIPS taps."""

    def __init__(self, net: str) -> None:
        super().__init__()
        if net not in BACKBONES:
            raise ValueError(f"unknown LPIPS backbone {net!r}; available: {sorted(BACKBONES)}")
        self.layers, self.taps = BACKBONES[net]
        self.features = nn.ModuleDict()
        for layer in self.layers:
            if isinstance(layer, tuple):
                index, cin, cout, kernel, stride, padding = layer
                self.features[str(index)] = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding)

    @property
    def channels(self) -> list[int]:
        widths = {layer[0]: layer[2] for layer in self.layers if isinstance(layer, tuple)}
        return [widths[tap] for tap in self.taps]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for layer in self.layers:
            if isinstance(layer, str):  # "M3": 3x3 stride-2 max pool (AlexNet); "M2": 2x2 (VGG)
                size = int(layer[1])
                x = F.max_pool2d(x, kernel_size=size, stride=2)
                continue
            x = F.relu(self.features[str(layer[0])](x))
            if layer[0] in self.taps:
                outputs.append(x)
                if len(outputs) == len(self.taps):
                    break
        return outputs


def unit_normalise(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Divide each spatial feature vector by its L2 norm over channels (LPIPS' normalize_tensor)."""
    return features / (features.square().sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """d(x, y) = sum_l mean_hw  w_l . (n_l(x) - n_l(y))^2, with n_l the unit-normalised features."""

    def __init__(self, net: str = "alex") -> None:
        super().__init__()
        self.net_name = net
        self.net = Backbone(net)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in self.net.channels)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-pair distances (B,) of images in [-1, 1]."""
        features_x = self.net((x - self.shift) / self.scale)
        features_y = self.net((y - self.shift) / self.scale)
        distance = x.new_zeros(x.shape[0])
        for lin, fx, fy in zip(self.lins, features_x, features_y, strict=True):
            difference = (unit_normalise(fx) - unit_normalise(fy)).square()
            distance = distance + lin(difference).mean(dim=(1, 2, 3))
        return distance


def _take(state: Mapping[str, torch.Tensor], key: str, shape: tuple[int, ...], what: str) -> torch.Tensor:
    if key not in state:
        raise MidmsError(f"the {what} weights lack {key}; the file does not have the expected layout")
    tensor = state[key]
    if tuple(tensor.shape) != shape:
        raise MidmsError(f"the {what} weight {key} has shape {tuple(tensor.shape)}, expected {shape}")
    return tensor.float()


def lpips_from_state_dicts(
    net: str, backbone_state: Mapping[str, torch.Tensor], heads_state: Mapping[str, torch.Tensor]
) -> LPIPS:
    """LPIPS from a torchvision backbone state dict (features.N.*; classifier keys are ignored) and
    a v0.1 heads file (lin<k>.model.1.weight); every expected tensor must be present with its shape."""
    model = LPIPS(net)
    state = {}
    for layer in model.net.layers:
        if isinstance(layer, tuple):
            index, cin, cout, kernel = layer[:4]
            state[f"net.features.{index}.weight"] = _take(
                backbone_state, f"features.{index}.weight", (cout, cin, kernel, kernel), f"{net} backbone"
            )
            state[f"net.features.{index}.bias"] = _take(
                backbone_state, f"features.{index}.bias", (cout,), f"{net} backbone"
            )
    for k, channels in enumerate(model.net.channels):
        state[f"lins.{k}.weight"] = _take(
            heads_state, f"lin{k}.model.1.weight", (1, channels, 1, 1), f"lpips-{net} heads"
        )
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)
