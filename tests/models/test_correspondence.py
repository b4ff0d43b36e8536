"""Correspondence networks: shapes, normalisation, parameter counts from the spec's layer list."""

from __future__ import annotations

import pytest
import torch

from midms_cli.models.blocks import SPADE, ResidualBlock, positional_norm
from midms_cli.models.correspondence import Correspondence, centre_normalize
from midms_cli.presets import preset


def conv(cin: int, cout: int, k: int, bias: bool = True) -> int:
    return cin * cout * k * k + (cout if bias else 0)


def spade(norm: int, label: int, hidden: int) -> int:
    return conv(label, hidden, 3) + 2 * conv(hidden, norm, 3)


def spade_resblock(fin: int, fout: int, ic: int, hidden: int) -> int:
    fmid = min(fin, fout)
    total = conv(fin, fmid, 3) + conv(fmid, fout, 3) + spade(fin, ic, hidden) + spade(fmid, ic, hidden)
    if fin != fout:
        total += conv(fin, fout, 1, bias=False) + spade(fin, ic, hidden)
    return total


def encoder(cin: int, ic: int, stem: tuple[int, int, int], out: int, hidden: int) -> int:
    """Three bias-free SN-IN convs (InstanceNorm has no parameters) and one SPADE residual block."""
    return (
        conv(cin, stem[0], 3, False)
        + conv(stem[0], stem[1], 3, False)
        + conv(stem[1], stem[2], 3, False)
        + spade_resblock(stem[2], out, ic, hidden)
    )


def expected_parameters(nc: int, latent: int, ch: int, stem, blocks: int, hidden: int) -> int:
    """Spec 1.4 table: SegEnc, RealEnc, IterEnc, trunk of ResidualBlocks (one PReLU slope each), θ, φ."""
    trunk = blocks * (2 * conv(ch + nc, ch + nc, 3) + 1)
    heads = 2 * conv(ch + nc, ch, 1)
    return (
        encoder(nc, nc, stem, ch, hidden)
        + encoder(latent, latent, stem, ch, hidden)
        + encoder(latent, ch, stem, ch, hidden)
        + trunk
        + heads
    )


def build(name: str) -> tuple[Correspondence, object]:
    """The preset's networks on the meta device: shapes and counts without allocating or initialising."""
    config = preset(name)
    with torch.device("meta"):
        return Correspondence(config.correspondence, config.latent_channels), config


@pytest.mark.parametrize("name", ["paper-celebahq", "tiny"])
def test_parameter_count_follows_the_layer_list(name):
    model, config = build(name)
    corr = config.correspondence
    counted = sum(p.numel() for p in model.parameters())
    assert counted == expected_parameters(
        corr.cond_channels,
        config.latent_channels,
        corr.channels,
        corr.stem_channels,
        corr.trunk_blocks,
        corr.spade_hidden,
    )


def test_paper_celebahq_widths():
    model, _ = build("paper-celebahq")
    assert sum(p.numel() for p in model.parameters()) == 24_928_900
    assert model.theta.in_channels == 256 + 15 and model.theta.out_channels == 256
    assert len(model.layer) == 4
    assert model.seg_enc.G_middle_1.norm_0.mlp_shared[1].out_channels == 128  # SPADE hidden width
    assert model.iter_enc.G_middle_1.norm_0.mlp_shared[1].in_channels == 256  # modulated by D_x
    assert model.real_enc.layer1[0].in_channels == 3


def test_tiny_shapes_and_normalised_matching_features():
    torch.manual_seed(0)
    config = preset("tiny")
    model = Correspondence(config.correspondence, config.latent_channels).eval()
    cond, latent = torch.rand(2, 15, 16, 16), torch.randn(2, config.latent_channels, 16, 16)
    d_x = model.condition_features(cond)
    d_y = model.latent_features(latent)
    assert d_x.shape == d_y.shape == (2, 32, 16, 16)
    f_x = model.condition_matching(d_x, cond)
    f_y = model.latent_matching(d_y, cond)
    iteration = model.iteration_features(latent, d_x)
    for f in (f_x, f_y, iteration):
        assert f.shape == (2, 32, 16, 16)
        assert torch.allclose(f.mean(dim=1), torch.zeros(2, 16, 16), atol=1e-5)
        assert torch.allclose(f.norm(dim=1), torch.ones(2, 16, 16), atol=1e-5)


def test_centre_normalize_matches_definition():
    f = torch.tensor([1.0, 2.0, 6.0]).view(1, 3, 1, 1)
    centred = torch.tensor([-2.0, -1.0, 3.0])
    assert torch.allclose(centre_normalize(f).flatten(), centred / centred.norm())


def test_positional_norm_uses_unbiased_channel_variance():
    x = torch.tensor([1.0, 2.0, 3.0, 6.0]).view(1, 4, 1, 1)
    mean, var = 3.0, ((2**2 + 1 + 0 + 3**2) / 3)
    expected = (x.flatten() - mean) / (var + 1e-5) ** 0.5
    assert torch.allclose(positional_norm(x).flatten(), expected)


def test_spade_with_zero_modulation_convs_is_positional_norm():
    block = SPADE(4, 2, hidden=8)
    for conv_layer in (block.mlp_gamma, block.mlp_beta):
        torch.nn.init.zeros_(conv_layer.weight)
        torch.nn.init.zeros_(conv_layer.bias)
    x = torch.randn(1, 4, 5, 5)
    assert torch.allclose(block(x, torch.rand(1, 2, 10, 10)), positional_norm(x))


def test_residual_block_shares_one_prelu_slope():
    block = ResidualBlock(6)
    assert sum(isinstance(m, torch.nn.PReLU) for m in block.modules()) == 1
    assert block.prelu.weight.numel() == 1 and float(block.prelu.weight.detach()) == pytest.approx(0.25)
