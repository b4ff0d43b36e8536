"""Style relevance and semantic consistency with VGG19 features (CoCosNet protocol).

Style relevance: colour (relu1_2) and texture (relu2_2). For each semantic region, the channel-wise
mean feature of the output over its region is compared with the exemplar's over the corresponding
region by cosine similarity; similarities are averaged over regions, then over images.
Regions: with part masks (synthfaces, CelebAMask-HQ) region k of the output is part k of the
condition and region k of the exemplar is part k of the exemplar's condition; parts absent from
either image are skipped. Edge maps carry no regions, so there the whole image is the one region.

Semantic consistency: cosine similarity between the output's and the source (ground-truth) image's
relu3_2, relu4_2 and relu5_2 feature maps, each map taken as one vector, averaged over the layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COLOUR_LAYER = "r12"
TEXTURE_LAYER = "r22"
SEMANTIC_LAYERS = ("r32", "r42", "r52")


def region_mean_features(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Channel-wise mean of features (B, C, h, w) over each region of masks (B, K, H, W) -> (B, K, C).

    Masks are resized to the feature resolution by area averaging, so they act as soft weights.
    """
    weights = F.adaptive_avg_pool2d(masks.to(features.dtype), features.shape[-2:])  # (B, K, h, w)
    summed = torch.einsum("bkhw,bchw->bkc", weights, features)
    return summed / weights.sum(dim=(2, 3))[..., None].clamp_min(1e-8)


def region_present(masks: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """(B, K) bool: the region covers some feature-resolution area."""
    weights = F.adaptive_avg_pool2d(masks.to(features.dtype), features.shape[-2:])
    return weights.sum(dim=(2, 3)) > 1e-6


def style_relevance(
    output_features: torch.Tensor,
    exemplar_features: torch.Tensor,
    output_masks: torch.Tensor | None = None,
    exemplar_masks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-image cosine similarity (B,) of region-mean features of output and exemplar (CoCosNet).

    Without masks the whole image is one region. Images where no region is present in both get NaN.
    """
    if output_masks is None or exemplar_masks is None:
        output_masks = output_features.new_ones(output_features.shape[0], 1, 1, 1)
        exemplar_masks = exemplar_features.new_ones(exemplar_features.shape[0], 1, 1, 1)
    output_means = region_mean_features(output_features, output_masks)
    exemplar_means = region_mean_features(exemplar_features, exemplar_masks)
    similarity = F.cosine_similarity(output_means, exemplar_means, dim=2, eps=1e-8)  # (B, K)
    valid = region_present(output_masks, output_features) & region_present(exemplar_masks, exemplar_features)
    counts = valid.sum(dim=1)
    total = (similarity * valid).sum(dim=1)
    return torch.where(counts > 0, total / counts.clamp_min(1), torch.full_like(total, float("nan")))


def semantic_consistency(
    output_features: dict[str, torch.Tensor],
    source_features: dict[str, torch.Tensor],
    layers: tuple[str, ...] = SEMANTIC_LAYERS,
) -> torch.Tensor:
    """Per-image mean over layers of the cosine similarity of flattened feature maps, (B,)."""
    values = [
        F.cosine_similarity(
            output_features[layer].flatten(1), source_features[layer].flatten(1), dim=1, eps=1e-8
        )
        for layer in layers
    ]
    return torch.stack(values).mean(dim=0)


class StyleAccumulator:
    """Running means of colour, texture (output vs exemplar) and semantic (output vs source) scores."""

    def __init__(self, vgg: torch.nn.Module) -> None:
        self.vgg = vgg
        self.sums = {"style_colour": 0.0, "style_texture": 0.0, "semantic_consistency": 0.0}
        self.counts = dict.fromkeys(self.sums, 0)

    def _accumulate(self, name: str, values: torch.Tensor) -> None:
        finite = values[torch.isfinite(values)]
        self.sums[name] += float(finite.sum())
        self.counts[name] += int(finite.numel())

    @torch.no_grad()
    def add(
        self,
        output: torch.Tensor,
        exemplar: torch.Tensor,
        source: torch.Tensor | None = None,
        output_masks: torch.Tensor | None = None,
        exemplar_masks: torch.Tensor | None = None,
    ) -> None:
        """Images (B, 3, H, W) in [-1, 1]; masks (B, K, H, W) bool in matching part order, or None."""
        layers = (
            (COLOUR_LAYER, TEXTURE_LAYER, *SEMANTIC_LAYERS)
            if source is not None
            else (COLOUR_LAYER, TEXTURE_LAYER)
        )
        output_features = self.vgg(output, layers)
        exemplar_features = self.vgg(exemplar, (COLOUR_LAYER, TEXTURE_LAYER))
        for name, layer in (("style_colour", COLOUR_LAYER), ("style_texture", TEXTURE_LAYER)):
            self._accumulate(
                name,
                style_relevance(
                    output_features[layer], exemplar_features[layer], output_masks, exemplar_masks
                ),
            )
        if source is not None:
            source_features = self.vgg(source, SEMANTIC_LAYERS)
            self._accumulate("semantic_consistency", semantic_consistency(output_features, source_features))

    def result(self) -> dict[str, float]:
        return {name: self.sums[name] / self.counts[name] for name in self.sums if self.counts[name]}
