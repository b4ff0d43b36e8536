"""Building blocks of the correspondence networks: SN-IN convs, PONO, SPADE, residual blocks.

Module and parameter names follow the official release (CoCosNet lineage) so a released state dict
maps onto them by renaming only the spectral-norm entries: the legacy hook's
`weight_orig / weight_u / weight_v` are our parametrization's `parametrizations.weight.original /
.0._u / .0._v`. Both compute σ = uᵀ W v with the stored u, v in eval mode, so the converted
module computes exactly the released effective weight.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm


def sn_conv(
    in_channels: int, out_channels: int, kernel_size: int, padding: int = 0, bias: bool = True
) -> nn.Conv2d:
    """A spectrally normalised conv (one power iteration per training forward, as the legacy hook)."""
    return spectral_norm(nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=bias))


class SNInstanceConv(nn.Sequential):
    """ "SN-IN conv" (official name): spectral-norm conv3x3 without bias, zero padding 1, InstanceNorm2d.

    A Sequential so parameters are named `0.*` as the official `layerN.0.*` entries.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            sn_conv(in_channels, out_channels, 3, padding=1, bias=False),
            nn.InstanceNorm2d(out_channels, affine=False),
        )


def positional_norm(x: Tensor, eps: float = 1e-5) -> Tensor:
    """PONO: per pixel, centre over channels and divide by √(unbiased channel variance + ε)."""
    mean = x.mean(dim=1, keepdim=True)
    std = (x.var(dim=1, keepdim=True) + eps).sqrt()
    return (x - mean) / std


class SPADE(nn.Module):
    """Spatially-adaptive modulation of PONO-normalised features: PONO(x)·(1 + γ(seg)) + β(seg).

    `seg` is nearest-resized to x's grid; reflection padding everywhere; no spectral norm.
    """

    def __init__(self, norm_channels: int, label_channels: int, hidden: int = 128):
        super().__init__()
        self.mlp_shared = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(label_channels, hidden, 3), nn.ReLU()
        )
        self.pad = nn.ReflectionPad2d(1)
        self.mlp_gamma = nn.Conv2d(hidden, norm_channels, 3)
        self.mlp_beta = nn.Conv2d(hidden, norm_channels, 3)

    def forward(self, x: Tensor, seg: Tensor) -> Tensor:
        seg = F.interpolate(seg, size=x.shape[-2:], mode="nearest")
        hidden = self.mlp_shared(seg)
        gamma, beta = self.mlp_gamma(self.pad(hidden)), self.mlp_beta(self.pad(hidden))
        return positional_norm(x) * (1 + gamma) + beta


class SPADEResBlock(nn.Module):
    """Residual block with SPADE modulation: shortcut + main path, no activation after the sum.

    Main: SPADE → LReLU(0.2) → reflect-pad → SN conv3x3 (fin→fmid) → SPADE → LReLU → reflect-pad →
    SN conv3x3 (fmid→fout). Shortcut, learned when fin ≠ fout: SPADE → SN conv1x1 without bias.
    """

    def __init__(self, fin: int, fout: int, label_channels: int, hidden: int = 128):
        super().__init__()
        fmid = min(fin, fout)
        self.learned_shortcut = fin != fout
        self.pad = nn.ReflectionPad2d(1)
        self.conv_0 = sn_conv(fin, fmid, 3)
        self.conv_1 = sn_conv(fmid, fout, 3)
        self.norm_0 = SPADE(fin, label_channels, hidden)
        self.norm_1 = SPADE(fmid, label_channels, hidden)
        if self.learned_shortcut:
            self.conv_s = sn_conv(fin, fout, 1, bias=False)
            self.norm_s = SPADE(fin, label_channels, hidden)

    def forward(self, x: Tensor, seg: Tensor) -> Tensor:
        shortcut = self.conv_s(self.norm_s(x, seg)) if self.learned_shortcut else x
        dx = self.conv_0(self.pad(F.leaky_relu(self.norm_0(x, seg), 0.2)))
        dx = self.conv_1(self.pad(F.leaky_relu(self.norm_1(dx, seg), 0.2)))
        return shortcut + dx


class ResidualBlock(nn.Module):
    """Trunk block: pad → conv → IN → PReLU → pad → conv → IN → + x → PReLU.

    One PReLU module (a single slope, init 0.25) serves both activations, as in the release.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.padding1 = nn.ReflectionPad2d(1)
        self.conv1 = nn.Conv2d(channels, channels, 3)
        self.bn1 = nn.InstanceNorm2d(channels, affine=False)
        self.prelu = nn.PReLU()
        self.padding2 = nn.ReflectionPad2d(1)
        self.conv2 = nn.Conv2d(channels, channels, 3)
        self.bn2 = nn.InstanceNorm2d(channels, affine=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.prelu(self.bn1(self.conv1(self.padding1(x))))
        out = self.bn2(self.conv2(self.padding2(out)))
        return self.prelu(out + x)


# Legacy torch.nn.utils.spectral_norm entry suffix -> our parametrization's entry suffix.
LEGACY_SPECTRAL_NORM_KEYS = {
    "weight_orig": "parametrizations.weight.original",
    "weight_u": "parametrizations.weight.0._u",
    "weight_v": "parametrizations.weight.0._v",
}


def convert_legacy_spectral_norm(name: str) -> str:
    """Rename one legacy spectral-norm state-dict key (`conv.weight_orig` -> `conv.parametrizations...`)."""
    head, _, tail = name.rpartition(".")
    if tail in LEGACY_SPECTRAL_NORM_KEYS:
        return f"{head}.{LEGACY_SPECTRAL_NORM_KEYS[tail]}" if head else LEGACY_SPECTRAL_NORM_KEYS[tail]
    return name
