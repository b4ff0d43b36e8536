"""The frozen VGG19 feature extractor of the training losses.

Reads two weight layouts: CoCosNet's `vgg19_conv.pth` (conv1_1.weight ...; Caffe preprocessing,
as MIDMs uses) and torchvision's `vgg19-dcbb9e9d.pth` (features.N.weight; ImageNet normalisation).
Returns the ReLU outputs r12, r22, r32, r42, r52 (relu1_2 ... relu5_2).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from midms_cli.errors import MidmsError
from midms_cli.weights import load_weight

# Conv names and widths of the VGG19 stack up to conv5_2 (the deepest layer any loss reads).
VGG19_CONVS: tuple[tuple[str, int, int], ...] = (
    ("conv1_1", 3, 64), ("conv1_2", 64, 64),
    ("conv2_1", 64, 128), ("conv2_2", 128, 128),
    ("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256), ("conv3_4", 256, 256),
    ("conv4_1", 256, 512), ("conv4_2", 512, 512), ("conv4_3", 512, 512), ("conv4_4", 512, 512),
    ("conv5_1", 512, 512), ("conv5_2", 512, 512),
)
# torchvision's vgg19().features indices of the same convs (ReLU and max-pool modules in between).
TORCHVISION_INDEX = dict(zip(
    (name for name, _, _ in VGG19_CONVS), (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30), strict=True))
LAYER_NAMES = ("r12", "r22", "r32", "r42", "r52")
# The ReLU after which each returned feature is taken.
_TAPS = {"conv1_2": "r12", "conv2_2": "r22", "conv3_2": "r32", "conv4_2": "r42", "conv5_2": "r52"}
# Convs after which a 2x2 max-pool follows (end of each block).
_POOL_AFTER = {"conv1_2", "conv2_2", "conv3_4", "conv4_4"}

# Caffe VGG: BGR mean in [0, 1] units (= [103.939, 116.779, 123.68] / 255), as the official losses.
CAFFE_BGR_MEAN = (0.40760392, 0.45795686, 0.48501961)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESSING = ("caffe", "imagenet")


def caffe_preprocess(image: torch.Tensor) -> torch.Tensor:
    """RGB in [-1, 1] -> [0, 1] -> BGR -> subtract the Caffe mean -> x255."""
    x = (image + 1) / 2
    x = x.flip(1)  # RGB -> BGR
    mean = torch.tensor(CAFFE_BGR_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) * 255


def imagenet_preprocess(image: torch.Tensor) -> torch.Tensor:
    """torchvision convention: RGB in [-1, 1] -> [0, 1] -> (x - mean) / std."""
    x = (image + 1) / 2
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class VGG19Features(nn.Module):
    """VGG19 conv1_1 ... conv5_2 with ReLU and 2x2 max-pooling; frozen, returns named ReLU outputs."""

    def __init__(self, preprocessing: str = "caffe") -> None:
        super().__init__()
        if preprocessing not in PREPROCESSING:
            raise ValueError(f"preprocessing must be one of {PREPROCESSING}, got {preprocessing!r}")
        self.preprocessing = preprocessing
        for name, cin, cout in VGG19_CONVS:
            self.add_module(name, nn.Conv2d(cin, cout, kernel_size=3, padding=1))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VGG19Features:
        # A loss network never leaves eval mode (it has no dropout/BN, but callers toggle .train()).
        return super().train(False)

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        return caffe_preprocess(image) if self.preprocessing == "caffe" else imagenet_preprocess(image)

    def forward(self, image: torch.Tensor, layers: tuple[str, ...] = LAYER_NAMES) -> dict[str, torch.Tensor]:
        """Features of an RGB image batch in [-1, 1]; stops after the deepest requested layer."""
        wanted = set(layers)
        unknown = wanted - set(LAYER_NAMES)
        if unknown:
            raise ValueError(f"unknown VGG layers {sorted(unknown)}; available: {LAYER_NAMES}")
        x = self.preprocess(image)
        out: dict[str, torch.Tensor] = {}
        for name, _, _ in VGG19_CONVS:
            x = F.relu(getattr(self, name)(x))
            tap = _TAPS.get(name)
            if tap in wanted:
                out[tap] = x
                if len(out) == len(wanted):
                    break
            if name in _POOL_AFTER:
                x = F.max_pool2d(x, 2)
        return out


def detect_layout(state: Mapping[str, torch.Tensor]) -> str:
    """'cocosnet' (conv1_1.weight ...) or 'torchvision' (features.0.weight ...)."""
    if "conv1_1.weight" in state:
        return "cocosnet"
    if "features.0.weight" in state:
        return "torchvision"
    raise MidmsError(
        "the vgg19 weights have neither CoCosNet keys (conv1_1.weight) nor torchvision keys "
        "(features.0.weight); add vgg19_conv.pth or vgg19-dcbb9e9d.pth with `midms weights add vgg19 FILE`"
    )


def _remap(state: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """State dict in our names (conv1_1.weight ...) from either layout."""
    remapped = {}
    for name, cin, cout in VGG19_CONVS:
        source = name if layout == "cocosnet" else f"features.{TORCHVISION_INDEX[name]}"
        for part, shape in (("weight", (cout, cin, 3, 3)), ("bias", (cout,))):
            key = f"{source}.{part}"
            if key not in state:
                raise MidmsError(
                    f"the vgg19 weights lack {key}; the file is not a complete VGG19 ({layout} layout)")
            tensor = state[key]
            if tuple(tensor.shape) != shape:
                raise MidmsError(f"the vgg19 weight {key} has shape {tuple(tensor.shape)}, expected {shape}")
            remapped[f"{name}.{part}"] = tensor.float()
    return remapped


def vgg19_from_state_dict(state: Mapping[str, torch.Tensor]) -> VGG19Features:
    """Build the feature net from either layout; the layout fixes the preprocessing."""
    layout = detect_layout(state)
    net = VGG19Features("caffe" if layout == "cocosnet" else "imagenet")
    net.load_state_dict(_remap(state, layout))
    return net


def load_vgg19() -> VGG19Features:
    """The registered `vgg19` weights as a frozen net; a MidmsError naming `midms weights add` if absent."""
    return vgg19_from_state_dict(load_weight("vgg19"))
