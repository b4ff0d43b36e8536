"""`midms weights import-midms` on checkpoints built here in the official layouts (random values).

The official correspondence networks are re-written below with the legacy spectral-norm hook and
the release's module names, independently of midms_cli.models.blocks; the imported model must
compute the same features. The official module's DDIM samplers are nn.Modules holding the LDM;
they are rebuilt here (with their schedule buffers computed in numpy as latent-diffusion does) so
that `state_dict()` repeats the LDM exactly as PyTorch does for the official module.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm as legacy_spectral_norm

from midms_cli.checkpoint import save_modules
from midms_cli.cli.app import main
from midms_cli.cli.state import STATE
from midms_cli.config import to_dict
from midms_cli.models.autoencoder import build_autoencoder
from midms_cli.models.ldm_layout import to_ldm_state_dict
from midms_cli.models.unet import UNetModel
from midms_cli.pipelines.translate import load_midm
from midms_cli.presets import preset

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


# -- the official module tree: the LDM, its samplers, set_copy() --------------------------------


def module_holding(tensors):
    """An nn.Module whose state_dict() is `tensors` (one submodule per dotted name part)."""
    root = nn.Module()
    for key, value in tensors.items():
        *path, leaf = key.split(".")
        node = root
        for part in path:
            if part not in node._modules:
                node.add_module(part, nn.Module())
            node = node._modules[part]
        node.register_buffer(leaf, value.clone())
    return root


class OfficialSampler(nn.Module):
    """latent-diffusion's DDIMSampler as a module: the LDM as `.model`, buffers set per call."""

    def __init__(self, model, diffusion):
        super().__init__()
        self.model, self.diffusion = model, diffusion

    def make_schedule(self, steps, eta):
        d = self.diffusion
        betas = np.linspace(d.linear_start**0.5, d.linear_end**0.5, d.timesteps, dtype=np.float64) ** 2
        acp = np.cumprod(1.0 - betas)
        f32 = lambda x: torch.tensor(np.asarray(x), dtype=torch.float32)  # noqa: E731
        a, a_prev = f32(acp), f32(np.append(1.0, acp[:-1]))
        buffers = {"betas": f32(betas), "alphas_cumprod": a, "alphas_cumprod_prev": a_prev,
                   "sqrt_alphas_cumprod": f32(np.sqrt(a.numpy())),
                   "sqrt_one_minus_alphas_cumprod": f32(np.sqrt(1.0 - a.numpy())),
                   "log_one_minus_alphas_cumprod": f32(np.log(1.0 - a.numpy())),
                   "sqrt_recip_alphas_cumprod": f32(np.sqrt(1.0 / a.numpy())),
                   "sqrt_recipm1_alphas_cumprod": f32(np.sqrt(1.0 / a.numpy() - 1))}
        grid = np.asarray(list(range(0, d.timesteps, d.timesteps // steps))) + 1
        alphas = a.numpy()[grid]
        alphas_prev = np.asarray([a.numpy()[0]] + a.numpy()[grid[:-1]].tolist())
        sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
        buffers |= {"ddim_sigmas": f32(sigmas),
                    "ddim_alphas": f32(alphas), "ddim_alphas_prev": f32(alphas_prev),
                    "ddim_sqrt_one_minus_alphas": f32(np.sqrt(1.0 - alphas)),
                    "ddim_sigmas_for_original_num_steps":
                        eta * torch.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))}
        for name, value in buffers.items():
            self.register_buffer(name, value)


class OfficialMIDMs(nn.Module):
    """The official module's attribute tree: diff_model, its sampler, the matching networks."""

    def __init__(self, ldm_state, matching, diffusion):
        super().__init__()
        self.diffusion = diffusion
        self.diff_model = module_holding(ldm_state)
        self.diffusion_sampler = OfficialSampler(self.diff_model, diffusion)
        for name, child in matching.named_children():
            self.add_module(name, child)

    def set_copy(self, random_ldm_state):
        self.copied_diff_model = module_holding(random_ldm_state)
        self.copied_diffusion_sampler = OfficialSampler(self.diff_model, self.diffusion)

    def inference_forward(self):
        """What one inference forward leaves behind: the loop's S = 16 and the refinement's 200, η = 1."""
        self.diffusion_sampler.make_schedule(16, 0.0)
        self.copied_diffusion_sampler.make_schedule(200, 1.0)


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
    ldm_state = to_ldm_state_dict(ours, "ldm", include_ema=True)
    sampler = OfficialSampler(None, diffusion_cfg)
    sampler.make_schedule(16, 0.0)
    ldm_state["betas"] = sampler.betas.clone()  # LatentDiffusion's own float32 schedule buffers
    ldm_state["alphas_cumprod"] = sampler.alphas_cumprod.clone()
    ldm_state["model_ema.num_updates"] = torch.tensor(0)
    module = OfficialMIDMs(ldm_state, official, diffusion_cfg)
    layouts = {"constructed": module.state_dict()}  # as train.py saves it (model.module.state_dict())
    module.set_copy({k: torch.randn_like(v) if v.is_floating_point() else v for k, v in ldm_state.items()})
    layouts["set_copy"] = module.state_dict()
    module.inference_forward()
    layouts["forward"] = module.state_dict()
    assert any(k.endswith("weight_orig") for k in layouts["constructed"])
    assert any(k.endswith("weight_u") for k in layouts["constructed"])
    assert "diffusion_sampler.model.model.diffusion_model.out.2.weight" in layouts["constructed"]
    assert "copied_diffusion_sampler.model.betas" in layouts["set_copy"]
    assert layouts["forward"]["diffusion_sampler.ddim_alphas"].shape == (17,)
    for name, state in layouts.items():
        torch.save({"state_dict": state}, root / f"{name}.pth")
    # The release itself: the networks and diff_model only.
    state = {k: v for k, v in layouts["constructed"].items() if not k.startswith("diffusion_sampler.")}
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


def import_args(root, checkpoint, out):
    ldm = str(root / "ldm.safetensors")
    return ["weights", "import-midms", str(checkpoint), "--ldm", ldm, "--out", str(out)]


def test_every_official_layout_imports_to_the_same_model(released, tmp_path, capsys):
    root, _, _ = released
    release = root / "midms_celebA_finetuned.pth"
    code, _, err = run(import_args(root, release, tmp_path / "release.safetensors"), capsys)
    assert code == 0, err
    reference = load_midm(tmp_path / "release.safetensors").state_dict()
    for layout in ("constructed", "set_copy", "forward"):
        out = tmp_path / f"{layout}.safetensors"
        code, _, err = run(import_args(root, root / f"{layout}.pth", out), capsys)
        assert code == 0, f"{layout}: {err}"
        imported = load_midm(out).state_dict()
        assert list(imported) == list(reference)
        assert all(torch.equal(imported[name], reference[name]) for name in reference), layout


def test_a_model_imported_from_a_forward_layout_translates(released, tmp_path, capsys):
    root, _, _ = released
    model = tmp_path / "m.safetensors"
    code, _, err = run(import_args(root, root / "forward.pth", model), capsys)
    assert code == 0, err
    np.save(tmp_path / "cond.npy", np.random.default_rng(0).random((NC, 32, 32)).astype(np.float32))
    from PIL import Image

    pixels = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "r.png")
    args = ["translate", str(tmp_path / "cond.npy"), str(tmp_path / "r.png"), "--ref-cond",
            str(tmp_path / "cond.npy"), "-o", str(tmp_path / "o.png"), "--model", str(model)]
    code, _, err = run(args, capsys)
    assert code == 0, err
    assert (tmp_path / "o.png").is_file()


@pytest.fixture(scope="module")
def forward_state(released):
    root, _, _ = released
    return torch.load(root / "forward.pth", weights_only=True)["state_dict"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s["diffusion_sampler.model.model.diffusion_model.out.2.bias"].add_(1),
         "'diffusion_sampler.model.model.diffusion_model.out.2.bias' differs from "
         "'diff_model.model.diffusion_model.out.2.bias'"),
        (lambda s: s.__setitem__("copied_diffusion_sampler.model.first_stage_model.quant_conv.weight",
                                 torch.zeros_like(s["diff_model.first_stage_model.quant_conv.weight"])),
         "'copied_diffusion_sampler.model.first_stage_model.quant_conv.weight' differs"),
        (lambda s: s.__setitem__("diffusion_sampler.model.extra", torch.zeros(1)), "'diff_model.extra'"),
        (lambda s: s.__setitem__("diffusion_sampler.ddim_alphas", s["diffusion_sampler.ddim_alphas"][1:]),
         "diffusion_sampler.ddim_alphas is no DDIM grid"),
        (lambda s: s["diffusion_sampler.ddim_sigmas"].add_(0.1),
         "'diffusion_sampler.ddim_sigmas' is not the DDIM value for S = 16"),
        (lambda s: s["copied_diffusion_sampler.betas"].mul_(1.01),
         "'copied_diffusion_sampler.betas' is not the LDM's schedule"),
        (lambda s: s.pop("diffusion_sampler.ddim_sqrt_one_minus_alphas"),
         "not 'diffusion_sampler.ddim_sqrt_one_minus_alphas'"),
        (lambda s: s.__setitem__("diffusion_sampler.ddim_timesteps", torch.zeros(17)),
         "unexpected key 'diffusion_sampler.ddim_timesteps'"),
    ],
)
def test_an_inconsistent_repeat_or_buffer_is_refused_by_name(forward_state, edit, message):
    from midms_cli.errors import MidmsError
    from midms_cli.official_layout import without_sampler_entries

    state = {k: v.clone() for k, v in forward_state.items()}
    edit(state)
    with pytest.raises(MidmsError) as caught:
        without_sampler_entries(state, ldm_config()[2])
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s["diffusion_sampler.model.model.diffusion_model.out.2.bias"].add_(1),
         "'diffusion_sampler.model.model.diffusion_model.out.2.bias' differs"),
        (lambda s: s["diff_model.betas"].mul_(1.01), "'diff_model.betas'"),
    ],
)
def test_the_command_refuses_in_one_line_and_writes_nothing(released, forward_state, tmp_path, capsys,
                                                             edit, message):
    root, _, _ = released
    state = {k: v.clone() for k, v in forward_state.items()}
    edit(state)
    torch.save({"state_dict": state}, tmp_path / "edited.pth")
    out = tmp_path / "out.safetensors"
    code, _, err = run(import_args(root, tmp_path / "edited.pth", out), capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_the_training_forward_schedule_and_a_reference_eta_are_recognised(released, tmp_path, capsys):
    from midms_cli.official_layout import step_count, without_sampler_entries

    root, official, _ = released
    _, _, diffusion = ldm_config()
    sampler = OfficialSampler(None, diffusion)
    for steps, eta in ((8, 0.0), (16, 0.0), (200, 1.0), (50, 0.5)):
        sampler.make_schedule(steps, eta)
        same_grid = {s for s in range(1, 501) if 1000 // s == 1000 // steps}
        assert step_count(diffusion, sampler.ddim_alphas) in same_grid
        state = {f"diffusion_sampler.{k}": v for k, v in sampler.state_dict().items()}
        assert without_sampler_entries(state | {"x": torch.zeros(1)}, diffusion) == {"x": torch.zeros(1)}
