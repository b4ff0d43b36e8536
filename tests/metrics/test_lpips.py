"""LPIPS: published key layouts, an independent torchvision-style reference, diversity protocol."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from midms_cli.errors import MidmsError
from midms_cli.metrics.lpips import DiversityAccumulator, pairwise_mean_lpips
from midms_cli.models.lpips_net import lpips_from_state_dicts

# torchvision alexnet().features, written out as torchvision builds it.
ALEXNET = [
    ("conv", 3, 64, 11, 4, 2),
    ("relu",),
    ("pool", 3),
    ("conv", 64, 192, 5, 1, 2),
    ("relu",),
    ("pool", 3),
    ("conv", 192, 384, 3, 1, 1),
    ("relu",),
    ("conv", 384, 256, 3, 1, 1),
    ("relu",),
    ("conv", 256, 256, 3, 1, 1),
    ("relu",),
    ("pool", 3),
]
ALEXNET_SLICES = [(0, 2), (2, 5), (5, 8), (8, 10), (10, 12)]  # LPIPS' alexnet slice1..slice5
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
VGG16_SLICES = [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
SHIFT = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
SCALE = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)


def _torchvision_features(net: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    if net == "alex":
        for spec in ALEXNET:
            if spec[0] == "conv":
                layers.append(nn.Conv2d(spec[1], spec[2], spec[3], stride=spec[4], padding=spec[5]))
            elif spec[0] == "relu":
                layers.append(nn.ReLU())
            else:
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2))
    else:
        channels = 3
        for item in VGG16_CFG:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU()]
                channels = item
    return nn.Sequential(*layers)


def _published_files(net: str, seed: int = 0):
    """A torchvision backbone state dict (with classifier keys) and a v0.1 heads file, random values."""
    torch.manual_seed(seed)
    features = _torchvision_features(net)
    backbone = {f"features.{k}": v.clone() for k, v in features.state_dict().items()}
    backbone["classifier.1.weight"] = torch.zeros(4, 4)  # torchvision files carry the classifier too
    widths = [64, 192, 384, 256, 256] if net == "alex" else [64, 128, 256, 512, 512]
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(widths)}
    return features, backbone, heads


def _reference_lpips(features: nn.Sequential, heads: dict, net: str, x, y) -> torch.Tensor:
    slices = ALEXNET_SLICES if net == "alex" else VGG16_SLICES
    hx, hy = (x - SHIFT) / SCALE, (y - SHIFT) / SCALE
    total = torch.zeros(x.shape[0])
    for k, (start, stop) in enumerate(slices):
        for layer in list(features)[start:stop]:
            hx, hy = layer(hx), layer(hy)
        nx = hx / (hx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        ny = hy / (hy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        weighted = ((nx - ny) ** 2 * heads[f"lin{k}.model.1.weight"]).sum(1)
        total += weighted.mean(dim=(1, 2))
    return total


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_matches_reference_and_is_zero_on_identical_images(net):
    features, backbone, heads = _published_files(net)
    model = lpips_from_state_dicts(net, backbone, heads)
    torch.manual_seed(1)
    x, y = torch.rand(2, 3, 48, 48) * 2 - 1, torch.rand(2, 3, 48, 48) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(model(x, y), _reference_lpips(features, heads, net, x, y), rtol=1e-4, atol=1e-6)
        assert torch.equal(model(x, x), torch.zeros(2))
        assert (model(x, y) > 0).all()


def test_missing_or_misshapen_head_is_a_user_error():
    _, backbone, heads = _published_files("alex")
    broken = dict(heads)
    del broken["lin4.model.1.weight"]
    with pytest.raises(MidmsError, match="lack lin4.model.1.weight"):
        lpips_from_state_dicts("alex", backbone, broken)
    broken = dict(heads, **{"lin0.model.1.weight": torch.rand(1, 32, 1, 1)})
    with pytest.raises(MidmsError, match=r"shape \(1, 32, 1, 1\), expected \(1, 64, 1, 1\)"):
        lpips_from_state_dicts("alex", backbone, broken)


def test_diversity_is_mean_over_pairs_then_conditions():
    _, backbone, heads = _published_files("alex")
    model = lpips_from_state_dicts("alex", backbone, heads)
    torch.manual_seed(2)
    images = torch.rand(3, 3, 48, 48) * 2 - 1
    with torch.no_grad():
        pairs = [float(model(images[i : i + 1], images[j : j + 1])) for i, j in ((0, 1), (0, 2), (1, 2))]
    assert pairwise_mean_lpips(model, images) == pytest.approx(sum(pairs) / 3, rel=1e-5)
    accumulator = DiversityAccumulator()
    accumulator.add(["a", "b", "a"], images)
    accumulator.add(["c"], images[:1])  # a condition with one output does not count
    value, conditions = accumulator.result(model)
    assert conditions == 1 and value == pytest.approx(pairs[1], rel=1e-5)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_load_lpips_from_files_added_to_the_weights_registry(net, tmp_path, monkeypatch):
    import dataclasses

    from midms_cli import weights
    from midms_cli.metrics.lpips import LPIPS_WEIGHTS, load_lpips

    monkeypatch.setenv("MIDMS_HOME", str(tmp_path / "home"))
    backbone_name, heads_name = LPIPS_WEIGHTS[net]
    with pytest.raises(MidmsError, match=f"midms weights add {backbone_name} FILE"):
        load_lpips(net)
    features, backbone, heads = _published_files(net)
    for name, state in ((backbone_name, backbone), (heads_name, heads)):
        entry = weights.REGISTRY[name]
        original = tmp_path / entry.sources[0].filename
        torch.save(state, original)
        # The random test file cannot carry the published checksum: pin the registry to its own.
        digest = weights.sha256_file(original)
        source = dataclasses.replace(entry.sources[0], sha256=digest, sha256_prefix=None)
        monkeypatch.setitem(weights.REGISTRY, name, dataclasses.replace(entry, sources=(source,)))
        assert weights.add_weight(name, original)["layout"] == source.layout
    model = load_lpips(net)
    torch.manual_seed(3)
    x, y = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(model(x, y), _reference_lpips(features, heads, net, x, y), rtol=1e-4, atol=1e-6)
