"""LPIPS diversity: mean LPIPS between outputs of one condition with different exemplars.

CoCosNet's protocol: for every condition, translate it with several exemplars, average the LPIPS
distance over all pairs of those outputs, then average over conditions. Higher means more diverse.
The number of exemplars per condition is the pair list's choice; the backbone defaults to AlexNet
(the LPIPS default; the paper does not say which it used).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Hashable

import torch

from midms_cli.models.lpips_net import LPIPS, lpips_from_state_dicts

# Registry names of the backbone file and the heads file of each LPIPS variant.
LPIPS_WEIGHTS = {"alex": ("alexnet", "lpips-alex"), "vgg": ("vgg16", "lpips-vgg")}


def load_lpips(net: str = "alex") -> LPIPS:
    """LPIPS from the weights registry; MidmsError naming `midms weights add` when a file is missing."""
    from midms_cli.weights import load_weight

    backbone_name, heads_name = LPIPS_WEIGHTS[net]
    return lpips_from_state_dicts(net, load_weight(backbone_name), load_weight(heads_name))


def pairwise_mean_lpips(model: LPIPS, images: torch.Tensor, batch_size: int = 16) -> float:
    """Mean LPIPS over all unordered pairs of images (K, 3, H, W) in [-1, 1]; K >= 2."""
    pairs = list(itertools.combinations(range(images.shape[0]), 2))
    if not pairs:
        raise ValueError("diversity needs at least two outputs per condition")
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = torch.tensor(pairs[start : start + batch_size])
            total += float(model(images[chunk[:, 0]], images[chunk[:, 1]]).sum())
    return total / len(pairs)


class DiversityAccumulator:
    """Collects outputs per condition key; `result()` is the mean over conditions with >= 2 outputs.

    Outputs are kept on the CPU until the end, so memory grows with the number of images.
    """

    def __init__(self) -> None:
        self.groups: dict[Hashable, list[torch.Tensor]] = defaultdict(list)

    def add(self, keys: list[Hashable], outputs: torch.Tensor) -> None:
        for key, output in zip(keys, outputs, strict=True):
            self.groups[key].append(output.detach().cpu())

    def result(self, model: LPIPS) -> tuple[float | None, int]:
        """(mean diversity, number of conditions used); (None, 0) when no condition has two outputs."""
        device = next(model.parameters()).device
        values = [
            pairwise_mean_lpips(model, torch.stack(group).to(device))
            for group in self.groups.values()
            if len(group) >= 2
        ]
        return (sum(values) / len(values), len(values)) if values else (None, 0)
