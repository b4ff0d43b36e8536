"""The LDM first stage: original parameter names and counts, shapes, quantisation, straight-through path."""

from __future__ import annotations

import math

import pytest
import torch

from midms_cli.config import AutoencoderConfig
from midms_cli.models.autoencoder import AttnBlock, build_autoencoder, gaussian_kl, vector_quantize
from midms_cli.presets import preset


def conv(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k + cout


def norm(c: int) -> int:
    return 2 * c


def resnet(cin: int, cout: int) -> int:
    shortcut = conv(cin, cout, 1) if cin != cout else 0
    return norm(cin) + conv(cin, cout, 3) + norm(cout) + conv(cout, cout, 3) + shortcut


def attn(c: int) -> int:
    return norm(c) + 4 * conv(c, c, 1)


def expected_parameters(cfg: AutoencoderConfig) -> int:
    """Layer-by-layer count of latent-diffusion's Encoder + Decoder + quant convs (+ codebook), no attention
    besides the mid blocks (attn_resolutions empty in VQ-f4 and KL-f8)."""
    ch, mult, n = cfg.ch, cfg.ch_mult, cfg.num_res_blocks
    top = ch * mult[-1]
    z_out = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
    mid = 2 * resnet(top, top) + attn(top)
    encoder = conv(cfg.in_channels, ch, 3) + mid + norm(top) + conv(top, z_out, 3)
    widths = [ch] + [ch * m for m in mult]
    for level in range(len(mult)):
        width = widths[level + 1]
        encoder += resnet(widths[level], width) + (n - 1) * resnet(width, width)
        if level < len(mult) - 1:
            encoder += conv(widths[level + 1], widths[level + 1], 3)
    decoder = conv(cfg.z_channels, top, 3) + mid + norm(ch * mult[0]) + conv(ch * mult[0], cfg.out_ch, 3)
    block_in = top
    for level in reversed(range(len(mult))):
        out = ch * mult[level]
        decoder += resnet(block_in, out) + n * resnet(out, out)
        block_in = out
        if level > 0:
            decoder += conv(out, out, 3)
    if cfg.kind == "vq":
        quant = conv(cfg.z_channels, cfg.embed_dim, 1) + conv(cfg.embed_dim, cfg.z_channels, 1)
        quant += cfg.n_embed * cfg.embed_dim
    else:
        quant = conv(2 * cfg.z_channels, 2 * cfg.embed_dim, 1) + conv(cfg.embed_dim, cfg.z_channels, 1)
    return encoder + decoder + quant


@pytest.mark.parametrize("name", ["paper-celebahq", "paper-lsun"])
def test_parameter_count_matches_the_original_layer_shapes(name):
    cfg = preset(name).autoencoder
    with torch.device("meta"):
        model = build_autoencoder(cfg)
    count = sum(p.numel() for p in model.parameters())
    assert count == expected_parameters(cfg)
    # Published sizes: VQ-f4 (Z=8192, d=3) 55.3M; KL-f8 83.7M (the same net as Stable Diffusion's VAE).
    assert round(count / 1e6, 1) == {"paper-celebahq": 55.3, "paper-lsun": 83.7}[name]


def test_parameter_names_follow_latent_diffusion():
    with torch.device("meta"):
        vq = build_autoencoder(preset("paper-celebahq").autoencoder)
        kl = build_autoencoder(preset("paper-lsun").autoencoder)
    names = dict(vq.state_dict())
    for key, shape in {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.0.block.0.norm1.weight": (128,),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.1.downsample.conv.weight": (256, 256, 3, 3),
        "encoder.mid.block_1.conv2.weight": (512, 512, 3, 3),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.mid.attn_1.proj_out.bias": (512,),
        "encoder.norm_out.weight": (512,),
        "encoder.conv_out.weight": (3, 512, 3, 3),
        "decoder.conv_in.weight": (512, 3, 3, 3),
        "decoder.up.2.block.2.conv1.weight": (512, 512, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.1.upsample.conv.weight": (256, 256, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3),
        "quant_conv.weight": (3, 3, 1, 1),
        "post_quant_conv.weight": (3, 3, 1, 1),
        "quantize.embedding.weight": (8192, 3),
    }.items():
        assert tuple(names[key].shape) == shape, key
    assert "decoder.up.0.upsample.conv.weight" not in names
    assert "encoder.down.2.downsample.conv.weight" not in names
    assert tuple(kl.state_dict()["quant_conv.weight"].shape) == (8, 8, 1, 1)
    assert tuple(kl.state_dict()["encoder.conv_out.weight"].shape) == (8, 512, 3, 3)


def tiny(kind: str = "vq", **overrides) -> AutoencoderConfig:
    values = dict(kind=kind, embed_dim=3, n_embed=16, z_channels=3, resolution=16, ch=32, ch_mult=(1, 2),
                  num_res_blocks=1)
    if kind == "kl":
        values.update(embed_dim=4, z_channels=4, double_z=True, n_embed=0)
    values.update(overrides)
    return AutoencoderConfig(**values)


def test_vq_encode_decode_shapes_and_forward_loss():
    torch.manual_seed(0)
    model = build_autoencoder(tiny(attn_resolutions=(8,)))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = model.encode(x)
    assert z.shape == (2, 3, 8, 8)
    assert model.decode(z).shape == (2, 3, 16, 16)
    recon, aux = model(x)
    assert recon.shape == x.shape and set(aux) == {"vq"}
    # tiny preset: 64 px images -> 8x16x16 latents
    tiny_preset = build_autoencoder(preset("tiny").autoencoder)
    assert tiny_preset.encode(torch.zeros(1, 3, 64, 64)).shape == (1, 8, 16, 16)
    with torch.device("meta"):
        paper = build_autoencoder(preset("paper-celebahq").autoencoder)
        assert paper.decode(paper.encode(torch.empty(1, 3, 256, 256))).shape == (1, 3, 256, 256)
        assert paper.encode(torch.empty(1, 3, 256, 256)).shape == (1, 3, 64, 64)


def test_quantisation_picks_the_nearest_code_and_legacy_loss():
    torch.manual_seed(1)
    codebook = torch.randn(10, 3)
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    z_q, loss = vector_quantize(z, codebook, beta=0.25)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    nearest = codebook[torch.cdist(flat, codebook).argmin(1)].reshape(2, 4, 4, 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(z_q.detach(), nearest)
    mse = ((nearest - z.detach()) ** 2).mean()
    torch.testing.assert_close(loss.detach(), 1.25 * mse)
    # Legacy weighting: the encoder-side (commitment) term has weight 1, the codebook-side term beta.
    loss.backward()
    torch.testing.assert_close(z.grad, 2 * (z.detach() - nearest) / z.numel())
    book = codebook.clone().requires_grad_(True)
    vector_quantize(z.detach(), book, beta=0.25)[1].backward()
    assert book.grad.abs().sum() > 0
    used = torch.cdist(flat, codebook).argmin(1)
    expected = torch.zeros_like(codebook)
    expected.index_add_(0, used, 0.25 * 2 * (codebook[used] - flat) / z.numel())
    torch.testing.assert_close(book.grad, expected)


def test_decode_gradient_passes_straight_through_the_quantiser():
    torch.manual_seed(2)
    model = build_autoencoder(tiny())
    z = torch.randn(1, 3, 8, 8, requires_grad=True)
    upstream = torch.randn(1, 3, 16, 16)
    (model.decode(z) * upstream).sum().backward()
    z_q = vector_quantize(z.detach(), model.quantize.embedding.weight.detach())[0]
    z_q = z_q.clone().requires_grad_(True)
    (model.decode_without_quantizing(z_q) * upstream).sum().backward()
    assert z.grad.abs().sum() > 0
    torch.testing.assert_close(z.grad, z_q.grad)


def test_kl_encode_mode_sample_scale_and_kl_term():
    torch.manual_seed(3)
    cfg = tiny("kl", scale_factor=0.5)
    model = build_autoencoder(cfg)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, logvar = model.posterior(x)
    torch.testing.assert_close(model.encode(x), 0.5 * mean)  # posterior "mode" is the default
    sampler = build_autoencoder(tiny("kl", posterior="sample"))
    sampler.load_state_dict(model.state_dict())
    torch.manual_seed(7)
    sample = sampler.encode(x)
    torch.manual_seed(7)
    torch.testing.assert_close(sample, mean + torch.exp(0.5 * logvar) * torch.randn_like(mean))
    z = model.encode(x)
    torch.testing.assert_close(model.decode(z), model.decoder(model.post_quant_conv(mean)))
    recon, aux = model(x)
    assert recon.shape == x.shape and set(aux) == {"kl"}
    # KL(N(m, s^2) || N(0, 1)) per element: log(1/s) + (s^2 + m^2 - 1) / 2
    m, lv = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    per_element = -0.5 * lv + (lv.exp() + m**2 - 1) / 2
    torch.testing.assert_close(gaussian_kl(m, lv), per_element.sum(dim=(1, 2, 3)).mean())


def test_first_stage_attention_matches_reference():
    torch.manual_seed(4)
    block = AttnBlock(32)
    x = torch.randn(2, 32, 3, 3)
    h = torch.nn.functional.group_norm(x, 32, block.norm.weight, block.norm.bias, eps=1e-6)
    q, k, v = (conv(h).reshape(2, 32, 9) for conv in (block.q, block.k, block.v))
    weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(32), dim=2)  # (B, query, key)
    out = torch.einsum("bcj,bij->bci", v, weights).reshape(2, 32, 3, 3)
    torch.testing.assert_close(block(x), x + block.proj_out(out), atol=1e-5, rtol=1e-5)


def test_decoder_activation_checkpointing_gives_the_same_image_and_gradient(monkeypatch):
    """Checkpointing the frozen decoder's blocks recomputes them in the backward pass: same values."""
    from midms_cli.models import autoencoder as autoencoder_module

    calls = []
    original = autoencoder_module.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(autoencoder_module, "checkpoint", counting)
    torch.manual_seed(3)
    model = build_autoencoder(preset("tiny").autoencoder).eval().requires_grad_(False)
    upstream = torch.randn(1, 3, 64, 64)
    results = []
    for checkpointing in (False, True):
        model.decoder.activation_checkpointing = checkpointing
        z = torch.randn(1, model.config.embed_dim, 16, 16, generator=torch.Generator().manual_seed(0))
        z.requires_grad_(True)
        image = model.decode(z)
        (image * upstream).sum().backward()
        results.append((image.detach(), z.grad))
    levels = len(model.config.ch_mult)
    # mid, every ResNet block and every upsampler (no attention at these resolutions).
    assert len(calls) == 1 + levels * (model.config.num_res_blocks + 1) + levels - 1
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # without gradients nothing is checkpointed
        model.decode(torch.randn(1, model.config.embed_dim, 16, 16))
    assert len(calls) == 1 + levels * (model.config.num_res_blocks + 1) + levels - 1
