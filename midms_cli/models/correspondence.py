"""The correspondence networks of MIDMs, as released: three encoders, a shared trunk, two heads.

SegEnc encodes the condition map, RealEnc an image latent, IterEnc an x0-prediction modulated by
the condition features (Eq. 8). The trunk is shared by both domains; the θ head serves the
condition side and the φ head the latent side. All at latent resolution, stride 1.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from midms_cli.config import CorrespondenceConfig
from midms_cli.models.blocks import ResidualBlock, SNInstanceConv, SPADEResBlock


def centre_normalize(features: Tensor) -> Tensor:
    """Per-pixel channel centring, then division by the per-pixel L2 norm.

    The release divides without ε; the clamp only changes the result for an all-zero
    centred vector, where the release produces NaN.
    """
    centred = features - features.mean(dim=1, keepdim=True)
    return centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-12)


class FeatureEncoder(nn.Module):
    """Three SN-IN convs and a SPADE residual block (official `ShallowAdaptiveFeatureGenerator`).

    Input x: (B, in_channels, h, w); modulation: (B, modulation_channels, h, w) -> (B, out_channels, h, w).
    """

    def __init__(
        self,
        in_channels: int,
        modulation_channels: int,
        stem: tuple[int, int, int],
        out_channels: int,
        spade_hidden: int,
    ):
        super().__init__()
        self.layer1 = SNInstanceConv(in_channels, stem[0])
        self.layer2 = SNInstanceConv(stem[0], stem[1])
        self.layer3 = SNInstanceConv(stem[1], stem[2])
        self.actvn = nn.LeakyReLU(0.2)
        self.G_middle_1 = SPADEResBlock(stem[2], out_channels, modulation_channels, spade_hidden)

    def forward(self, x: Tensor, modulation: Tensor) -> Tensor:
        h = self.layer1(x)
        h = self.layer2(self.actvn(h))
        h = self.layer3(self.actvn(h))
        return self.G_middle_1(h, modulation)


class Correspondence(nn.Module):
    """All matching parameters of MIDMs: seg_enc, real_enc, iter_enc, layer (trunk), theta, phi."""

    def __init__(self, config: CorrespondenceConfig, latent_channels: int):
        super().__init__()
        self.config = config
        nc, ch = config.cond_channels, config.channels
        stem, hidden = tuple(config.stem_channels), config.spade_hidden
        self.seg_enc = FeatureEncoder(nc, nc, stem, ch, hidden)
        self.real_enc = FeatureEncoder(latent_channels, latent_channels, stem, ch, hidden)
        self.iter_enc = FeatureEncoder(latent_channels, ch, stem, ch, hidden)
        self.layer = nn.Sequential(*(ResidualBlock(ch + nc) for _ in range(config.trunk_blocks)))
        self.theta = nn.Conv2d(ch + nc, ch, 1)
        self.phi = nn.Conv2d(ch + nc, ch, 1)

    def condition_features(self, condition: Tensor) -> Tensor:
        """D_x = SegEnc(c↓), modulated by the condition itself. condition: (B, nc, h, w) at latent size."""
        return self.seg_enc(condition, condition)

    def latent_features(self, latent: Tensor) -> Tensor:
        """D = RealEnc(z), modulated by the latent itself (used for z_y and z_gt)."""
        return self.real_enc(latent, latent)

    def iteration_features(self, x0_pred: Tensor, condition_features: Tensor) -> Tensor:
        """Eq. 8: F = IterEnc(x̂0, D_x), centred and normalised."""
        return centre_normalize(self.iter_enc(x0_pred, condition_features))

    def condition_matching(self, condition_features: Tensor, condition: Tensor) -> Tensor:
        """f_x = θ(Trunk([D_x, c↓])), centred and normalised."""
        return centre_normalize(self.theta(self.layer(torch.cat([condition_features, condition], dim=1))))

    def latent_matching(self, latent_features: Tensor, condition: Tensor) -> Tensor:
        """f_y = φ(Trunk([D_y, c_y↓])) (or f_gt with the condition's own map), centred and normalised."""
        return centre_normalize(self.phi(self.layer(torch.cat([latent_features, condition], dim=1))))
