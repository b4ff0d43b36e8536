"""Feature networks for the VGG-style losses: VGG19, or the frozen first stage.

`first-stage` reads multi-scale activations of the autoencoder's own encoder under the five layer
names r12 ... r52, so the losses run with no external weights (tiny preset, tests, the demo).
"""

from __future__ import annotations

import torch
from torch import nn

from midms_cli.config import LossConfig
from midms_cli.models.vgg import LAYER_NAMES, load_vgg19


class FirstStageFeatures(nn.Module):
    """Encoder activations of a (frozen) first stage named like VGG layers, shallow to deep.

    Taps, in order: conv_in, the output of every resolution level (before its downsampling), and the
    middle block. The last five are named r12, r22, r32, r42, r52 (the shallowest are dropped when
    the encoder has more than three levels).
    """

    def __init__(self, first_stage: nn.Module) -> None:
        super().__init__()
        self.encoder = first_stage.encoder
        taps = 2 + len(self.encoder.down)
        if taps < len(LAYER_NAMES):
            raise ValueError(f"the first-stage encoder has {taps} taps; the losses need {len(LAYER_NAMES)}")
        self._skip = taps - len(LAYER_NAMES)

    def _taps(self, image: torch.Tensor) -> list[torch.Tensor]:
        h = self.encoder.conv_in(image)
        taps = [h]
        for stage in self.encoder.down:
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h)
            taps.append(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        taps.append(self.encoder.mid(h))
        return taps

    def forward(self, image: torch.Tensor, layers: tuple[str, ...] = LAYER_NAMES) -> dict[str, torch.Tensor]:
        """Named activations of an RGB batch in [-1, 1] (the encoder's own input range)."""
        named = dict(zip(LAYER_NAMES, self._taps(image)[self._skip:], strict=True))
        return {name: named[name] for name in layers}


def build_feature_net(losses: LossConfig, first_stage: nn.Module) -> nn.Module:
    """The loss network named by `losses.feature_net`; VGG19 fails at once if its weights are missing."""
    if losses.feature_net == "vgg19":
        return load_vgg19()
    if losses.feature_net == "first-stage":
        return FirstStageFeatures(first_stage)
    raise ValueError(f"unknown feature net {losses.feature_net!r}")
