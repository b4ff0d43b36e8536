"""First-stage inference in strips and chunks: the values of whole tensors, in both memory layouts."""

from __future__ import annotations

import pytest
import torch

from midms_cli.config import AutoencoderConfig
from midms_cli.models import autoencoder, strips
from midms_cli.models.autoencoder import (
    AttnBlock,
    Decoder,
    Downsample,
    Encoder,
    ResnetBlock,
    Upsample,
    group_norm,
)

LAYOUTS = [torch.contiguous_format, torch.channels_last]
# Strips may reach a convolution algorithm of oneDNN other than the whole tensor does (its choice
# depends on the shape), which rounds sums differently; on the CPUs tested these sizes are bit-equal.
ROUNDING = {"rtol": 1e-5, "atol": 1e-5}
# Sizes whose heights are not multiples of the strip height (8 rows at the smallest strips), and odd ones.
SIZES = [(64, 64), (40, 56), (36, 52)]


def randomized(module: torch.nn.Module, layout: torch.memory_format) -> torch.nn.Module:
    """module in eval mode with all parameters drawn at random (GroupNorm's affine included)."""
    torch.manual_seed(0)
    for parameter in module.parameters():
        parameter.data.normal_(0.0, 0.2)
    return module.eval().to(memory_format=layout)


def small_config() -> AutoencoderConfig:
    return AutoencoderConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,),
                             resolution=64)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_group_norm_affine_equals_nn_group_norm(layout):
    norm = randomized(group_norm(256), layout)
    x = (torch.randn(2, 256, 19, 23) * 3 + 1).contiguous(memory_format=layout)
    scale, shift = strips.group_norm_affine(x, norm)
    torch.testing.assert_close(strips.fused_multiply_add(x, scale, shift), norm(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("channels", [(64, 32), (32, 32)])
def test_resnet_block_in_strips_equals_the_block(layout, channels):
    block = randomized(ResnetBlock(*channels), layout)
    x = torch.randn(2, channels[0], 37, 29).contiguous(memory_format=layout)
    with torch.no_grad():
        whole = block(x.clone())
        stripped = strips.resnet_block(block, x, budget_bytes=1)  # the smallest strips: 9 rows
    torch.testing.assert_close(stripped, whole, **ROUNDING)
    assert strips.layout(stripped) == layout


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("height", [8, 9, 21, 40])
def test_resamplers_in_strips_equal_the_modules(layout, height):
    x = torch.randn(1, 32, height, 64).contiguous(memory_format=layout)
    up, down = randomized(Upsample(32), layout), randomized(Downsample(32), layout)
    with torch.no_grad():
        torch.testing.assert_close(strips.upsample(up, x, budget_bytes=1), up(x), **ROUNDING)
        torch.testing.assert_close(strips.downsample(down, x, budget_bytes=1), down(x), **ROUNDING)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("size", SIZES)
def test_encoder_and_decoder_in_strips_equal_whole_tensors(layout, size):
    cfg = small_config()
    encoder, decoder = randomized(Encoder(cfg), layout), randomized(Decoder(cfg), layout)
    image = (torch.rand(2, 3, *size) * 2 - 1).contiguous(memory_format=layout)
    latent = torch.randn(2, 3, size[0] // 4, size[1] // 4).contiguous(memory_format=layout)
    with torch.no_grad():
        for net, x in ((encoder, image), (decoder, latent)):
            net.strip_bytes = 2048
            stripped = net(x)
            net.strip_bytes = None
            torch.testing.assert_close(stripped, net(x), **ROUNDING)


def test_strips_only_at_inference(monkeypatch):
    calls = []
    original = strips.resnet_block
    monkeypatch.setattr(strips, "resnet_block", lambda *args: calls.append(1) or original(*args))
    decoder = Decoder(small_config()).eval()
    z = torch.randn(1, 3, 16, 16, requires_grad=True)
    decoder(z).sum().backward()  # gradients enabled: the whole-tensor path, differentiable
    assert not calls and z.grad is not None
    with torch.no_grad():
        decoder.train()(z)  # training mode: dropout may be active
        assert not calls
        decoder.eval()(z)
    assert calls


def test_chunked_attention_equals_one_softmax_over_all_pixels(monkeypatch):
    block = randomized(AttnBlock(64), torch.contiguous_format)
    x = torch.randn(2, 64, 12, 10)
    with torch.no_grad():
        chunked = block(x)
        monkeypatch.setattr(autoencoder, "ATTENTION_ELEMENTS", 2**30)
        torch.testing.assert_close(chunked, block(x), **ROUNDING)


def test_chunked_code_search_picks_the_nearest_code(monkeypatch):
    codebook, z = torch.randn(512, 3), torch.randn(2, 3, 9, 7)
    distances = torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, 3).double(), codebook.double())
    monkeypatch.setattr(autoencoder, "CODE_SEARCH_ELEMENTS", 4096)  # 8 pixels at a time
    assert torch.equal(autoencoder.nearest_codes(z, codebook), distances.argmin(dim=1))
