"""`midms weights import-midms` on a checkpoint built here in the official layout (random values).

The official correspondence networks are re-written below with the legacy spectral-norm hook and
the release's module names, independently of midms_cli.models.blocks; the imported model must
compute the same features.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm as legacy_spectral_norm

from midms_cli.checkpoint import save_modules
from midms_cli.cli.app import main
from midms_cli.cli.state import STATE
from midms_cli.config import preset, to_dict
from midms_cli.models.autoencoder import build_autoencoder
from midms_cli.models.ldm_layout import to_ldm_state_dict
from midms_cli.models.unet import UNetModel
from midms_cli.pipelines.translate import load_midm

NC, LATENT, CH, STEM, HIDDEN, BLOCKS = 15, 3, 16, (8, 16, 24), 8, 2


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Reading third-party weights uses scratch space in the cache: keep it out of the real home."""
    monkeypatch.setenv("MIDMS_HOME", str(tmp_path / "home"))


# -- the official networks (CoCosNet lineage), legacy spectral norm ----------------------------


def pono(x):
    return (x - x.mean(1, keepdim=True)) / (x.var(1, keepdim=True) + 1e-5).sqrt()


class OfficialSPADE(nn.Module):
    def __init__(self, norm_nc, label_nc):
        super().__init__()
        self.mlp_shared = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(label_nc, HIDDEN, 3), nn.ReLU())
        self.pad = nn.ReflectionPad2d(1)
        self.mlp_gamma = nn.Conv2d(HIDDEN, norm_nc, 3)
        self.mlp_beta = nn.Conv2d(HIDDEN, norm_nc, 3)

    def forward(self, x, seg):
        actv = self.mlp_shared(F.interpolate(seg, size=x.shape[2:], mode="nearest"))
        return pono(x) * (1 + self.mlp_gamma(self.pad(actv))) + self.mlp_beta(self.pad(actv))


class OfficialSPADEResnetBlock(nn.Module):
    def __init__(self, fin, fout, ic):
        super().__init__()
        fmid = min(fin, fout)
        self.pad = nn.ReflectionPad2d(1)
        self.conv_0 = legacy_spectral_norm(nn.Conv2d(fin, fmid, 3))
        self.conv_1 = legacy_spectral_norm(nn.Conv2d(fmid, fout, 3))
        self.conv_s = legacy_spectral_norm(nn.Conv2d(fin, fout, 1, bias=False))
        self.norm_0, self.norm_1, self.norm_s = (
            OfficialSPADE(fin, ic),
            OfficialSPADE(fmid, ic),
            OfficialSPADE(fin, ic),
        )

    def forward(self, x, seg):
        shortcut = self.conv_s(self.norm_s(x, seg))
        dx = self.conv_0(self.pad(F.leaky_relu(self.norm_0(x, seg), 0.2)))
        return shortcut + self.conv_1(self.pad(F.leaky_relu(self.norm_1(dx, seg), 0.2)))


def sn_instance(cin, cout):
    return nn.Sequential(
        legacy_spectral_norm(nn.Conv2d(cin, cout, 3, padding=1, bias=False)),
        nn.InstanceNorm2d(cout, affine=False),
    )


class OfficialEncoder(nn.Module):
    def __init__(self, inch, ic):
        super().__init__()
        self.layer1, self.layer2, self.layer3 = (
            sn_instance(inch, STEM[0]),
            sn_instance(*STEM[:2]),
            sn_instance(*STEM[1:]),
        )
        self.G_middle_1 = OfficialSPADEResnetBlock(STEM[2], CH, ic)

    def forward(self, x, seg=None):
        seg = x if seg is None else seg
        h = self.layer3(F.leaky_relu(self.layer2(F.leaky_relu(self.layer1(x), 0.2)), 0.2))
        return self.G_middle_1(h, seg)


class OfficialResidualBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.padding1, self.padding2 = nn.ReflectionPad2d(1), nn.ReflectionPad2d(1)
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3), nn.Conv2d(c, c, 3)
        self.bn1, self.bn2 = nn.InstanceNorm2d(c), nn.InstanceNorm2d(c)
        self.prelu = nn.PReLU()

    def forward(self, x):
        out = self.prelu(self.bn1(self.conv1(self.padding1(x))))
        return self.prelu(self.bn2(self.conv2(self.padding2(out))) + x)


class OfficialMatching(nn.Module):
    def __init__(self):
        super().__init__()
        self.seg_enc, self.real_enc, self.iter_enc = (
            OfficialEncoder(NC, NC),
            OfficialEncoder(LATENT, LATENT),
            OfficialEncoder(LATENT, CH),
        )
        self.layer = nn.Sequential(*(OfficialResidualBlock(CH + NC) for _ in range(BLOCKS)))
        self.theta, self.phi = nn.Conv2d(CH + NC, CH, 1), nn.Conv2d(CH + NC, CH, 1)


# -- fixtures ----------------------------------------------------------------------------------


def ldm_config():
    config = preset("tiny")  # narrowed, with the released model's 3 latent channels
    autoencoder = dataclasses.replace(config.autoencoder, resolution=32, n_embed=16, embed_dim=LATENT,
                                      z_channels=LATENT)
    unet = dataclasses.replace(config.unet, image_size=8, channel_mult=(1, 2), attention_resolutions=(2,),
                               in_channels=LATENT, out_channels=LATENT)
    return autoencoder, unet, config.diffusion


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("import_midms")
    torch.manual_seed(0)
    autoencoder_cfg, unet_cfg, diffusion_cfg = ldm_config()
    first_stage, pretrained_unet, finetuned_unet = (
        build_autoencoder(autoencoder_cfg),
        UNetModel(unet_cfg),
        UNetModel(unet_cfg),
    )
    for parameter in finetuned_unet.parameters():  # the fine-tuned copy must differ from the LDM's
        nn.init.normal_(parameter, std=0.02)
    save_modules(
        root / "ldm.safetensors",
        {"first_stage": first_stage, "unet": pretrained_unet},
        {
            "autoencoder": to_dict(autoencoder_cfg),
            "unet": to_dict(unet_cfg),
            "diffusion": to_dict(diffusion_cfg),
        },
        "ldm",
    )
    official = OfficialMatching()
    official.train()
    with torch.no_grad():  # a few training forwards move the stored u, v away from their init
        for _ in range(3):
            official.seg_enc(torch.rand(1, NC, 8, 8))
            official.real_enc(torch.randn(1, LATENT, 8, 8))
            official.iter_enc(torch.randn(1, LATENT, 8, 8), torch.randn(1, CH, 8, 8))
    official.eval()
    ours = {f"first_stage.{k}": v for k, v in first_stage.state_dict().items()}
    ours |= {f"unet.{k}": v for k, v in finetuned_unet.state_dict().items()}
    state = {f"diff_model.{k}": v for k, v in to_ldm_state_dict(ours, "ldm", include_ema=True).items()}
    state["diff_model.betas"] = torch.zeros(1000)
    state["diff_model.model_ema.num_updates"] = torch.tensor(0)
    state |= official.state_dict()
    assert any(k.endswith("weight_orig") for k in state) and any(k.endswith("weight_u") for k in state)
    torch.save({"state_dict": state}, root / "midms_celebA_finetuned.pth")
    return root, official, finetuned_unet


def run(args, capsys):
    STATE.json = False
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    return (code, *capsys.readouterr())


def test_import_maps_every_key_and_keeps_the_effective_weights(released, tmp_path, capsys):
    root, official, finetuned_unet = released
    out = tmp_path / "celeba.safetensors"
    code, stdout, err = run(
        [
            "weights",
            "import-midms",
            str(root / "midms_celebA_finetuned.pth"),
            "--ldm",
            str(root / "ldm.safetensors"),
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    model = load_midm(out)
    assert model.config.condition == "celebahq-edges"
    assert (
        model.config.correspondence.stem_channels == STEM
        and model.config.correspondence.trunk_blocks == BLOCKS
    )
    for name, tensor in finetuned_unet.state_dict().items():
        assert torch.equal(model.unet.state_dict()[name], tensor), name

    torch.manual_seed(1)
    condition, latent, x0 = (
        torch.rand(2, NC, 8, 8),
        torch.randn(2, LATENT, 8, 8),
        torch.randn(2, LATENT, 8, 8),
    )
    corr = model.correspondence
    with torch.no_grad():
        d_x, d_y = official.seg_enc(condition), official.real_enc(latent)
        assert torch.allclose(corr.condition_features(condition), d_x, atol=1e-5)
        assert torch.allclose(corr.latent_features(latent), d_y, atol=1e-5)
        iteration = official.iter_enc(x0, d_x)
        ours_iteration = corr.iteration_features(x0, d_x)
        centred = iteration - iteration.mean(1, keepdim=True)
        assert torch.allclose(ours_iteration, centred / centred.norm(dim=1, keepdim=True), atol=1e-5)
        theta = official.theta(official.layer(torch.cat([d_x, condition], 1)))
        theta = theta - theta.mean(1, keepdim=True)
        assert torch.allclose(
            corr.condition_matching(d_x, condition), theta / theta.norm(dim=1, keepdim=True), atol=1e-5
        )


def test_unknown_keys_and_a_first_stage_only_ldm_are_rejected(released, tmp_path, capsys):
    root, official, _ = released
    state = torch.load(root / "midms_celebA_finetuned.pth", weights_only=True)["state_dict"]
    state["discriminator.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "other.pth")
    out = tmp_path / "out.safetensors"
    code, _, err = run(
        [
            "weights",
            "import-midms",
            str(tmp_path / "other.pth"),
            "--ldm",
            str(root / "ldm.safetensors"),
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 2 and "discriminator.weight" in err and len(err.strip().splitlines()) == 1
    autoencoder_cfg, _, _ = ldm_config()
    save_modules(
        tmp_path / "vq.safetensors",
        {"first_stage": build_autoencoder(autoencoder_cfg)},
        {"autoencoder": to_dict(autoencoder_cfg)},
        "ldm",
    )
    code, _, err = run(
        [
            "weights",
            "import-midms",
            str(root / "midms_celebA_finetuned.pth"),
            "--ldm",
            str(tmp_path / "vq.safetensors"),
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 2 and "first stage" in err
    assert not out.exists()
