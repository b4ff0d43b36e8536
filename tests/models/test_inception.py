"""The FID Inception-v3: pytorch-fid's key layout, strict loading, FID-specific pools, preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from midms_cli.errors import MidmsError
from midms_cli.models.inception import FIDInceptionV3, fid_preprocess, load_fid_inception

# Keys and shapes of pytorch-fid's pt_inception-2015-12-05-6726825d.pth (torchvision Inception3
# names, no AuxLogits, 1008-class fc), written out from that layout, not from our module.
PYTORCH_FID_KEYS = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.weight": (32,),
    "Conv2d_1a_3x3.bn.bias": (32,),
    "Conv2d_1a_3x3.bn.running_mean": (32,),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_2a_3x3.conv.weight": (32, 32, 3, 3),
    "Conv2d_2b_3x3.conv.weight": (64, 32, 3, 3),
    "Conv2d_3b_1x1.conv.weight": (80, 64, 1, 1),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1),
    "Mixed_5b.branch5x5_1.conv.weight": (48, 192, 1, 1),
    "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_5b.branch3x3dbl_3.conv.weight": (96, 96, 3, 3),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5c.branch_pool.conv.weight": (64, 256, 1, 1),
    "Mixed_5d.branch1x1.conv.weight": (64, 288, 1, 1),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6a.branch3x3dbl_3.conv.weight": (96, 96, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6b.branch7x7_3.conv.weight": (192, 128, 7, 1),
    "Mixed_6c.branch7x7dbl_1.conv.weight": (160, 768, 1, 1),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_6e.branch_pool.conv.weight": (192, 768, 1, 1),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch1x1.conv.weight": (320, 1280, 1, 1),
    "Mixed_7b.branch3x3_2a.conv.weight": (384, 384, 1, 3),
    "Mixed_7b.branch3x3_2b.conv.weight": (384, 384, 3, 1),
    "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
    "Mixed_7b.branch3x3dbl_2.conv.weight": (384, 448, 3, 3),
    "Mixed_7c.branch3x3dbl_3b.bn.running_mean": (384,),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}
# torchvision's inception_v3 (aux_logits, 1000 classes) has 27,161,264 parameters; removing the
# aux head (3,326,696) and widening fc to 1008 classes (+16,392) gives the FID network's count.
PYTORCH_FID_PARAMETERS = 27_161_264 - 3_326_696 + 16_392
PYTORCH_FID_CONVS = 94  # 5 stem + 3x7 (A) + 4 (B) + 4x10 (C) + 6 (D) + 2x9 (E) BasicConv2d units


def _pytorch_fid_style_checkpoint(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the published file's layout (no num_batches_tracked, as in that file)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in FIDInceptionV3().state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.endswith("conv.weight"):
            fan_in = value[0].numel()
            state[key] = torch.randn(value.shape, generator=generator) * (2.0 / fan_in) ** 0.5
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(value.shape, generator=generator)
        elif key.endswith("bn.weight"):
            state[key] = 0.8 + 0.4 * torch.rand(value.shape, generator=generator)
        else:
            state[key] = 0.1 * torch.randn(value.shape, generator=generator)
    return state


def test_layout_matches_pytorch_fid_keys_shapes_and_parameter_count():
    network = FIDInceptionV3()
    state = network.state_dict()
    for key, shape in PYTORCH_FID_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    assert sum(p.numel() for p in network.parameters()) == PYTORCH_FID_PARAMETERS
    assert sum(1 for k in state if k.endswith("conv.weight")) == PYTORCH_FID_CONVS
    assert not any(k.startswith("AuxLogits") for k in state)
    assert all(m.eps == 0.001 for m in network.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_checkpoint_in_published_layout_loads_strictly():
    checkpoint = _pytorch_fid_style_checkpoint()
    assert len(checkpoint) == PYTORCH_FID_CONVS * 5 + 2
    network = load_fid_inception(checkpoint)
    assert not network.training and not any(p.requires_grad for p in network.parameters())
    loaded = network.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in checkpoint.items())


def test_incomplete_checkpoint_is_a_user_error():
    checkpoint = _pytorch_fid_style_checkpoint()
    del checkpoint["Mixed_6c.branch1x1.conv.weight"]
    with pytest.raises(MidmsError, match="missing: Mixed_6c.branch1x1.conv.weight"):
        load_fid_inception(checkpoint)


def test_fid_specific_pools_and_2048_features():
    """A/C/E blocks average-pool without counting padding; Mixed_7c max-pools its pool branch."""
    network = load_fid_inception(_pytorch_fid_style_checkpoint(1))
    seen = {}

    def remember(name):
        def hook(module, inputs, output):
            seen[name] = inputs[0].detach().clone()

        return hook

    for name in ("Mixed_5b", "Mixed_6b", "Mixed_7b", "Mixed_7c"):
        block = getattr(network, name)
        block.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name + ".in", i[0].clone()))
        block.branch_pool.register_forward_hook(remember(name + ".pool"))
    with torch.no_grad():
        features = network(torch.rand(1, 3, 40, 40))
    assert features.shape == (1, 2048)  # pool3
    assert torch.isfinite(features).all() and (features >= 0).all()  # a mean of ReLU outputs
    for name in ("Mixed_5b", "Mixed_6b", "Mixed_7b"):
        block_input = seen[name + ".in"]
        expected = F.avg_pool2d(block_input, 3, stride=1, padding=1, count_include_pad=False)
        assert torch.allclose(seen[name + ".pool"], expected), name
        counted = F.avg_pool2d(block_input, 3, stride=1, padding=1)
        assert not torch.allclose(seen[name + ".pool"], counted)
    expected = F.max_pool2d(seen["Mixed_7c.in"], 3, stride=1, padding=1)
    assert torch.allclose(seen["Mixed_7c.pool"], expected)


def _bilinear_half_pixel(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres (align_corners=False), clamped at the borders."""
    channels, height, width = image.shape

    def axis(n_in):
        src = np.maximum((np.arange(size) + 0.5) * n_in / size - 0.5, 0.0)
        low = np.floor(src).astype(int)
        high = np.minimum(low + 1, n_in - 1)
        return low, high, src - low

    y0, y1, wy = axis(height)
    x0, x1, wx = axis(width)
    top = image[:, y0][:, :, x0] * (1 - wx) + image[:, y0][:, :, x1] * wx
    bottom = image[:, y1][:, :, x0] * (1 - wx) + image[:, y1][:, :, x1] * wx
    return top * (1 - wy)[None, :, None] + bottom * wy[None, :, None]


def test_preprocessing_is_bilinear_resize_to_299_then_minus_one_to_one():
    torch.manual_seed(0)
    image = torch.rand(1, 3, 8, 11)
    expected = 2 * _bilinear_half_pixel(image[0].double().numpy(), 299) - 1
    actual = fid_preprocess(image)[0].double().numpy()
    assert actual.shape == (3, 299, 299)
    np.testing.assert_allclose(actual, expected, atol=1e-5)
