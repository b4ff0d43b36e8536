"""The LDM UNet: parameter count and names of the original, timestep embedding, legacy attention, shapes."""

from __future__ import annotations

import math

import pytest
import torch

from midms_cli.config import UNetConfig
from midms_cli.models.unet import (
    AttentionBlock,
    GroupNorm32,
    ResBlock,
    UNetModel,
    legacy_qkv_attention,
    timestep_embedding,
)
from midms_cli.presets import preset


def small_config(**overrides) -> UNetConfig:
    values = dict(image_size=8, in_channels=3, out_channels=3, model_channels=32, num_res_blocks=1,
                  attention_resolutions=(2,), channel_mult=(1, 2), num_heads=-1, num_head_channels=16)
    values.update(overrides)
    return UNetConfig(**values)


def randomize(module: torch.nn.Module) -> None:
    """Replace the zero initialisation of output layers so every path contributes."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.1)


def test_paper_celebahq_unet_has_the_original_parameter_count():
    # 274,056,163: the celeba256 LDM UNet (model_channels 224, mult 1-2-3-4, heads of 32 channels).
    with torch.device("meta"):
        unet = UNetModel(preset("paper-celebahq").unet)
    assert sum(p.numel() for p in unet.parameters()) == 274_056_163


def test_parameter_names_follow_openaimodel():
    with torch.device("meta"):
        names = set(UNetModel(preset("paper-celebahq").unet).state_dict())
        updown = set(UNetModel(preset("paper-lsun").unet).state_dict())
    for key in ("time_embed.0.weight", "time_embed.2.bias", "input_blocks.0.0.weight",
                "input_blocks.1.0.in_layers.0.weight", "input_blocks.1.0.in_layers.2.weight",
                "input_blocks.1.0.emb_layers.1.weight", "input_blocks.1.0.out_layers.0.weight",
                "input_blocks.1.0.out_layers.3.weight", "input_blocks.3.0.op.weight",
                "input_blocks.4.0.skip_connection.weight", "input_blocks.4.1.qkv.weight",
                "input_blocks.4.1.norm.weight", "input_blocks.4.1.proj_out.weight",
                "middle_block.0.in_layers.0.weight", "middle_block.1.qkv.weight",
                "middle_block.2.out_layers.3.bias",
                "output_blocks.2.2.conv.weight", "output_blocks.0.0.skip_connection.weight",
                "out.0.weight", "out.2.weight"):
        assert key in names, key
    # resblock_updown (LSUN): resampling is a ResBlock, so there is no `op` conv.
    assert "input_blocks.3.0.in_layers.0.weight" in updown
    assert not any(k.endswith(".op.weight") for k in updown)
    assert not any(k.endswith(".conv.weight") and k.startswith("output_blocks") for k in updown)
    # scale-shift norm: the embedding projection is twice as wide (scale and shift).
    with torch.device("meta"):
        lsun = UNetModel(preset("paper-lsun").unet)
    assert lsun.input_blocks[1][0].emb_layers[1].weight.shape == (2 * 192, 4 * 192)


def reference_timestep_embedding(t: list[int], dim: int) -> torch.Tensor:
    """openaimodel's formula element by element: [cos(t·w_k)..., sin(t·w_k)...], w_k = 1e4^(-k/half)."""
    half = dim // 2
    rows = []
    for value in t:
        freqs = [math.exp(-math.log(10000.0) * k / half) for k in range(half)]
        row = [math.cos(value * f) for f in freqs] + [math.sin(value * f) for f in freqs]
        if dim % 2:
            row.append(0.0)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float32)


@pytest.mark.parametrize("dim", [8, 7, 224])
def test_timestep_embedding_matches_openaimodel_formula(dim):
    t = [0, 1, 63, 999]
    ours = timestep_embedding(torch.tensor(t), dim)
    assert ours.shape == (4, dim)
    torch.testing.assert_close(ours, reference_timestep_embedding(t, dim), atol=2e-4, rtol=1e-4)


def reference_legacy_attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """Per head h the fused channels are [q_h | k_h | v_h] (QKVAttentionLegacy), softmax over keys."""
    batch, width, length = qkv.shape
    d = width // (3 * heads)
    out = torch.zeros(batch, heads * d, length, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            block = qkv[b, h * 3 * d:(h + 1) * 3 * d].double()
            q, k, v = block[:d], block[d:2 * d], block[2 * d:]
            logits = q.t() @ k / math.sqrt(d)  # (T query, S key)
            weights = torch.softmax(logits, dim=1)
            out[b, h * d:(h + 1) * d] = v @ weights.t()
    return out.float()


def test_attention_uses_the_legacy_qkv_order():
    torch.manual_seed(0)
    qkv = torch.randn(2, 3 * 2 * 4, 5)  # 2 heads of 4 channels, 5 positions
    ours = legacy_qkv_attention(qkv, num_heads=2)
    torch.testing.assert_close(ours, reference_legacy_attention(qkv, 2), atol=1e-5, rtol=1e-5)
    # The other layout (q, k, v blocks first, then heads) gives a different answer: the order matters.
    q, k, v = qkv.chunk(3, dim=1)
    new_order = torch.cat([torch.cat([x[:, h * 4:(h + 1) * 4] for x in (q, k, v)], 1) for h in range(2)], 1)
    assert not torch.allclose(ours, reference_legacy_attention(new_order, 2), atol=1e-3)


def test_attention_block_matches_reference():
    torch.manual_seed(1)
    block = AttentionBlock(64, num_heads=2)
    randomize(block)
    x = torch.randn(2, 64, 3, 3)
    flat = x.reshape(2, 64, 9)
    normed = torch.nn.functional.group_norm(flat, 32, block.norm.weight, block.norm.bias, eps=1e-5)
    qkv = torch.einsum("oc,bct->bot", block.qkv.weight[:, :, 0], normed) + block.qkv.bias[None, :, None]
    attended = reference_legacy_attention(qkv, 2)
    projected = torch.einsum("oc,bct->bot", block.proj_out.weight[:, :, 0], attended)
    expected = flat + projected + block.proj_out.bias[None, :, None]
    torch.testing.assert_close(block(x), expected.reshape(2, 64, 3, 3), atol=1e-4, rtol=1e-4)


def test_resblock_scale_shift_norm():
    torch.manual_seed(2)
    block = ResBlock(32, 16, 0.0, 64, use_scale_shift_norm=True)
    randomize(block)
    x, emb = torch.randn(2, 32, 4, 4), torch.randn(2, 16)
    silu = torch.nn.functional.silu
    gn = torch.nn.functional.group_norm
    h = block.in_layers[2](silu(gn(x, 32, block.in_layers[0].weight, block.in_layers[0].bias)))
    scale, shift = block.emb_layers[1](silu(emb)).chunk(2, dim=1)
    h = gn(h, 32, block.out_layers[0].weight, block.out_layers[0].bias)
    h = h * (1 + scale[..., None, None]) + shift[..., None, None]
    expected = block.skip_connection(x) + block.out_layers[3](silu(h))
    torch.testing.assert_close(block(x, emb), expected, atol=1e-5, rtol=1e-5)


def test_group_norm_runs_in_float32_and_keeps_the_input_dtype():
    torch.manual_seed(3)
    norm = GroupNorm32(32)
    x = (torch.randn(1, 32, 4, 4) * 100 + 1000).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, torch.nn.functional.group_norm(x.float(), 32).to(torch.bfloat16))


@pytest.mark.parametrize("updown", [False, True])
def test_small_unet_forward_shape_and_time_dependence(updown):
    torch.manual_seed(4)
    cfg = small_config(use_scale_shift_norm=updown, resblock_updown=updown, num_heads=2, num_head_channels=-1)
    unet = UNetModel(cfg)
    randomize(unet)
    x = torch.randn(2, 3, 8, 8)
    eps = unet(x, torch.tensor([1, 500]))
    assert eps.shape == (2, 3, 8, 8)
    assert not torch.allclose(eps, unet(x, torch.tensor([2, 500])))
    # The output layer starts at zero, as the original: a fresh UNet predicts ε = 0.
    assert torch.count_nonzero(UNetModel(cfg)(x, torch.tensor([1, 1]))) == 0


def test_tiny_preset_forward_and_paper_forward_on_meta():
    tiny = preset("tiny")
    unet = UNetModel(tiny.unet)
    out = unet(torch.randn(1, 8, tiny.latent_size, tiny.latent_size), torch.tensor([10]))
    assert out.shape == (1, 8, 16, 16)  # the tiny first stage has 8 latent channels
    for name, channels, size in (("paper-celebahq", 3, 64), ("paper-lsun", 4, 32)):
        with torch.device("meta"):
            unet = UNetModel(preset(name).unet)
            out = unet(torch.empty(2, channels, size, size), torch.zeros(2, dtype=torch.long))
        assert out.shape == (2, channels, size, size)


def test_scalar_timestep_and_activation_checkpointing_give_the_same_result():
    torch.manual_seed(5)
    unet = UNetModel(small_config())
    randomize(unet)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(unet(x, 7), unet(x, torch.tensor([7, 7])))
    plain = unet(x, torch.tensor([3, 9])).square().sum()
    grads = torch.autograd.grad(plain, list(unet.parameters()))
    unet.activation_checkpointing = True
    checkpointed = unet(x, torch.tensor([3, 9])).square().sum()
    grads_ckpt = torch.autograd.grad(checkpointed, list(unet.parameters()))
    torch.testing.assert_close(checkpointed, plain)
    for a, b in zip(grads, grads_ckpt, strict=True):
        torch.testing.assert_close(a, b)
