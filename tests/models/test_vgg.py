"""VGG19 loss network: both weight layouts (real key names, random values) and their preprocessing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from midms_cli.errors import MidmsError
from midms_cli.models import vgg

# torchvision's vgg19().features configuration ("M" = 2x2 max-pool), written out independently.
_TV_CFG = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    512,
    "M",
)
# Index just past the ReLU that ends each tapped layer in torchvision's Sequential.
_TV_CUTS = {"r12": 4, "r22": 9, "r32": 14, "r42": 23, "r52": 32}


def _torchvision_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = 3
    for v in _TV_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
            cin = v
    return nn.Sequential(*layers)


def _cocosnet_state() -> dict[str, torch.Tensor]:
    """Random weights under CoCosNet's VGG19_feature_color_torchversion names (conv1_1 ... conv5_4)."""
    torch.manual_seed(3)
    widths = (
        [(3, 64), (64, 64), (64, 128), (128, 128)]
        + [(128, 256)]
        + [(256, 256)] * 3
        + [(256, 512)]
        + [(512, 512)] * 7
    )
    names = [
        "conv1_1",
        "conv1_2",
        "conv2_1",
        "conv2_2",
        "conv3_1",
        "conv3_2",
        "conv3_3",
        "conv3_4",
        "conv4_1",
        "conv4_2",
        "conv4_3",
        "conv4_4",
        "conv5_1",
        "conv5_2",
        "conv5_3",
        "conv5_4",
    ]
    state = {}
    for name, (cin, cout) in zip(names, widths, strict=True):
        conv = nn.Conv2d(cin, cout, 3, padding=1)
        state[f"{name}.weight"] = conv.weight.detach().clone()
        state[f"{name}.bias"] = conv.bias.detach().clone()
    return state


def test_caffe_preprocessing_by_hand():
    image = torch.tensor([1.0, 0.0, -1.0]).view(1, 3, 1, 1)  # RGB -> [1, 0.5, 0] in [0, 1]
    out = vgg.caffe_preprocess(image).flatten()
    expected = torch.tensor([(0.0 - 0.40760392) * 255, (0.5 - 0.45795686) * 255, (1.0 - 0.48501961) * 255])
    assert torch.allclose(out, expected, atol=1e-4)


def test_imagenet_preprocessing_by_hand():
    image = torch.tensor([1.0, 0.0, -1.0]).view(1, 3, 1, 1)
    out = vgg.imagenet_preprocess(image).flatten()
    expected = torch.tensor([(1 - 0.485) / 0.229, (0.5 - 0.456) / 0.224, (0 - 0.406) / 0.225])
    assert torch.allclose(out, expected, atol=1e-5)


def test_torchvision_layout_matches_torchvision_sequential_with_imagenet_normalisation():
    torch.manual_seed(4)
    reference = _torchvision_features()
    state = {f"features.{k}": v for k, v in reference.state_dict().items()}
    net = vgg.vgg19_from_state_dict(state)
    assert net.preprocessing == "imagenet"
    image = torch.rand(2, 3, 16, 16) * 2 - 1
    feats = net(image)
    x = ((image + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]
    ).view(1, 3, 1, 1)
    for name, cut in _TV_CUTS.items():
        assert torch.allclose(feats[name], reference[:cut](x), rtol=1e-4, atol=1e-5), name


def test_cocosnet_layout_uses_caffe_preprocessing():
    state = _cocosnet_state()
    net = vgg.vgg19_from_state_dict(state)
    assert net.preprocessing == "caffe"
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    feats = net(image, layers=("r12", "r22"))
    assert set(feats) == {"r12", "r22"}
    # r12 by hand from the stored conv1_1 / conv1_2 weights on the Caffe-preprocessed input.
    x = ((image + 1) / 2)[:, [2, 1, 0]] - torch.tensor([0.40760392, 0.45795686, 0.48501961]).view(1, 3, 1, 1)
    x = x * 255
    r11 = torch.relu(torch.nn.functional.conv2d(x, state["conv1_1.weight"], state["conv1_1.bias"], padding=1))
    r12 = torch.relu(
        torch.nn.functional.conv2d(r11, state["conv1_2.weight"], state["conv1_2.bias"], padding=1)
    )
    assert torch.allclose(feats["r12"], r12, rtol=1e-4, atol=1e-3)
    assert feats["r22"].shape == (1, 128, 8, 8)


def test_feature_shapes_and_frozen():
    net = vgg.vgg19_from_state_dict(_cocosnet_state())
    feats = net(torch.zeros(1, 3, 32, 32))
    assert {k: tuple(v.shape[1:]) for k, v in feats.items()} == {
        "r12": (64, 32, 32),
        "r22": (128, 16, 16),
        "r32": (256, 8, 8),
        "r42": (512, 4, 4),
        "r52": (512, 2, 2),
    }
    assert not any(p.requires_grad for p in net.parameters())
    net.train()
    assert not net.training


def test_unknown_layout_and_incomplete_weights_are_user_errors():
    with pytest.raises(MidmsError, match="midms weights add vgg19"):
        vgg.vgg19_from_state_dict({"foo.weight": torch.zeros(1)})
    state = _cocosnet_state()
    del state["conv4_2.bias"]
    with pytest.raises(MidmsError, match="conv4_2.bias"):
        vgg.vgg19_from_state_dict(state)


def test_first_stage_feature_net_needs_no_weights_and_maps_encoder_levels():
    from midms_cli.config import LossConfig
    from midms_cli.models.autoencoder import build_autoencoder
    from midms_cli.models.feature_net import build_feature_net
    from midms_cli.presets import preset

    torch.manual_seed(5)
    config = preset("tiny")
    first_stage = build_autoencoder(config.autoencoder).requires_grad_(False)
    net = build_feature_net(LossConfig(feature_net="first-stage"), first_stage)
    image = (torch.rand(2, 3, 64, 64) * 2 - 1).requires_grad_(True)
    feats = net(image)
    ch = config.autoencoder.ch
    # conv_in and level 0 at full resolution, level 1 at 1/2, level 2 and the middle block at 1/4.
    assert {k: tuple(v.shape[1:]) for k, v in feats.items()} == {
        "r12": (ch, 64, 64),
        "r22": (ch, 64, 64),
        "r32": (2 * ch, 32, 32),
        "r42": (4 * ch, 16, 16),
        "r52": (4 * ch, 16, 16),
    }
    # r12 is exactly the encoder's first convolution.
    assert torch.allclose(feats["r12"], first_stage.encoder.conv_in(image))
    feats["r52"].sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0


def test_vgg_feature_net_without_weights_names_the_fix(tmp_path, monkeypatch):
    from midms_cli.config import LossConfig
    from midms_cli.models.feature_net import build_feature_net

    monkeypatch.setenv("MIDMS_HOME", str(tmp_path))
    with pytest.raises(MidmsError, match="midms weights add vgg19"):
        build_feature_net(LossConfig(feature_net="vgg19"), nn.Identity())


def test_registered_cocosnet_file_loads_through_the_weights_registry(tmp_path, monkeypatch):
    from midms_cli.weights import add_weight

    monkeypatch.setenv("MIDMS_HOME", str(tmp_path / "home"))
    state = _cocosnet_state()
    file = tmp_path / "vgg19_conv.pth"
    torch.save(state, file)
    add_weight("vgg19", file)
    net = vgg.load_vgg19()
    assert net.preprocessing == "caffe"
    assert torch.equal(net.conv5_2.weight, state["conv5_2.weight"])
