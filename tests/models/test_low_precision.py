"""bfloat16 copies of the UNet and first stage are drop-in replacements: float32 in, float32 out,
float32 normalisation and quantisation inside, close to the float32 model (issue #9's bf16 path)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from midms_cli.models.autoencoder import build_autoencoder, nearest_codes
from midms_cli.models.unet import GroupNorm32, UNetModel
from midms_cli.presets import preset


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize(module: torch.nn.Module) -> torch.nn.Module:
    """Non-zero values for the zero-initialised output layers, so the comparison is not trivial."""
    with torch.no_grad():
        for param in module.parameters():
            if not param.any():
                param.normal_(0, 0.05)
    return module


def test_bfloat16_group_norm_matches_float32_arithmetic_on_the_same_inputs():
    torch.manual_seed(0)
    norm = GroupNorm32(64)
    with torch.no_grad():
        norm.weight.normal_(1, 0.1)
        norm.bias.normal_(0, 0.1)
    x = (torch.randn(2, 64, 5, 5) * 3 + 1).bfloat16()
    low = copy.deepcopy(norm).bfloat16()
    out = low(x.contiguous(memory_format=torch.channels_last))
    assert out.dtype == torch.bfloat16
    # Reference: float32 group norm of the same (bf16-valued) input and parameters, rounded once.
    expected = F.group_norm(x.float(), 32, low.weight.float(), low.bias.float(), norm.eps).bfloat16()
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=1e-2)


def test_bfloat16_unet_takes_and_returns_float32_and_stays_close():
    torch.manual_seed(0)
    config = preset("tiny").unet
    unet = randomize(UNetModel(config).eval())
    low = copy.deepcopy(unet).to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    x, t = torch.randn(2, config.in_channels, 16, 16), torch.tensor([249, 63])
    with torch.no_grad():
        reference, out = unet(x, t), low(x, t)
    assert out.dtype == torch.float32 and out.shape == reference.shape
    relative = (out - reference).abs().mean() / reference.abs().mean()
    assert relative < 0.03


def test_bfloat16_first_stage_quantises_in_float32_and_returns_float32():
    torch.manual_seed(0)
    cfg = dataclasses.replace(preset("tiny").autoencoder, kind="vq", double_z=False,
                              resolution=32, n_embed=64)
    model = build_autoencoder(cfg).eval()
    with torch.no_grad():
        model.quantize.embedding.weight.normal_(0, 1)
    low = copy.deepcopy(model).to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    z = torch.randn(1, cfg.embed_dim, 8, 8)
    with torch.no_grad():
        latent, decoded = low.encode(image), low.decode(z)
        quantised, _ = low.quantize_latent(z)
    assert latent.dtype == decoded.dtype == quantised.dtype == torch.float32
    # The code choice is made in float32 with the full-precision latent: the bf16-rounded codebook
    # is the only difference, so the same codes are picked as by a float32 search on that codebook.
    codebook = low.quantize.embedding.weight.float()
    expected = codebook[nearest_codes(z, codebook)].reshape(1, 8, 8, cfg.embed_dim).permute(0, 3, 1, 2)
    # (z + (z_q − z) is z_q up to one float32 rounding: the straight-through form.)
    torch.testing.assert_close(quantised, expected, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(latent, model.encode(image), atol=0.1, rtol=0.05)


def test_bf16_translation_stays_within_one_grey_level_of_fp32():
    """MIDM.set_precision("bf16"): same sampler, UNet in bfloat16; the image moves < 1/255 on average.

    With a VQ first stage as in the paper's CelebA-HQ and DeepFashion models: decoding snaps the
    latent to the codebook, which absorbs the UNet's bfloat16 rounding almost everywhere.
    """
    from midms_cli.models.midm import MIDM
    from midms_cli.sampler import translate

    torch.manual_seed(0)
    config = preset("tiny")
    config.autoencoder = dataclasses.replace(config.autoencoder, kind="vq", double_z=False, n_embed=256)
    reference = randomize(MIDM(config).eval())
    low = copy.deepcopy(reference).set_precision("bf16")
    assert next(low.unet.parameters()).dtype == torch.bfloat16
    assert next(low.first_stage.parameters()).dtype == torch.float32
    condition = (torch.rand(1, 15, 64, 64) > 0.9).float()
    exemplar, exemplar_condition = torch.rand(1, 3, 64, 64) * 2 - 1, (torch.rand(1, 15, 64, 64) > 0.9).float()
    images = [translate(model, condition, exemplar, exemplar_condition,
                        generator=torch.Generator().manual_seed(0)).image for model in (reference, low)]
    assert images[1].dtype == torch.float32
    mae_255 = float((images[1] - images[0]).abs().mean() * 127.5)
    assert 0 < mae_255 < 1.0


def _tiny_midm():
    from midms_cli.models.midm import MIDM

    torch.manual_seed(0)
    return randomize(MIDM(preset("tiny")).eval())


def _forward(model):
    """The first stage's latent and the UNet's ε of fixed inputs."""
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1
    x = torch.randn(2, model.config.unet.in_channels, 16, 16, generator=gen)
    with torch.no_grad():
        return model.first_stage.encode(image), model.unet(x, torch.tensor([249, 63]))


def test_fp32_precision_is_the_built_contiguous_model_bit_for_bit():
    """The default path computes exactly what the model as built (and as trained) computes, even
    after a round trip through channels-last: no layout that reorders float32 sums."""
    model = _tiny_midm()
    reference = _forward(model)
    model.set_precision("fp32-cl")
    networks = [*model.unet.parameters(), *model.first_stage.parameters()]
    weights = [p for p in networks if p.dim() == 4 and p.shape[-1] > 1]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model.set_precision("fp32")
    assert model.precision == "fp32"
    assert all(p.is_contiguous() for p in networks)
    for got, expected in zip(_forward(model), reference, strict=True):
        assert torch.equal(got, expected)


def test_refiner_unet_follows_the_models_precision():
    model = _tiny_midm()
    refiner = UNetModel(model.config.unet).eval()
    model.set_precision("bf16")
    assert model.prepare_unet(refiner) is refiner
    conv = next(p for p in refiner.parameters() if p.dim() == 4)
    assert conv.dtype == torch.bfloat16 and conv.is_contiguous(memory_format=torch.channels_last)
    model.set_precision("fp32")
    model.prepare_unet(refiner)
    conv = next(p for p in refiner.parameters() if p.dim() == 4)
    assert conv.dtype == torch.float32 and conv.is_contiguous()


def test_unknown_precision_is_refused_by_name():
    with pytest.raises(ValueError, match="fp16"):
        _tiny_midm().set_precision("fp16")
