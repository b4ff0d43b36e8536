"""`midms weights export-ldm`: a model back in the original latent-diffusion layout; import-ldm reads
the export to the same tensors and configs (round trip), and the checkpoint loads with weights_only."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml
from test_import_ldm import ldm_yaml, original_ldm_state, run
from test_translate import micro_config

from midms_cli.checkpoint import load_checkpoint
from midms_cli.config import to_dict
from midms_cli.ldm_import import ldm_configs
from midms_cli.models.midm import MIDM
from midms_cli.pipelines.translate import save_midm


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIDMS_HOME", str(tmp_path / "home"))


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
    return model


def test_a_midms_model_exports_and_imports_back_unchanged(tmp_path, capsys):
    config = micro_config()
    config.autoencoder = dataclasses.replace(config.autoencoder, scale_factor=0.5)
    model = _randomised(MIDM(config))
    (tmp_path / "run").mkdir()
    save_midm(tmp_path / "run" / "model.safetensors", model)
    export = tmp_path / "export"
    code, out, err = run(capsys, "weights", "export-ldm", str(tmp_path / "run"), "-o", str(export))
    assert code == 0, err
    state = torch.load(tmp_path / "export" / "model.ckpt", weights_only=True)["state_dict"]
    # The original key layout, spelled out independently of ldm_layout.
    for name, value in model.first_stage.state_dict().items():
        assert torch.equal(state["first_stage_model." + name], value)
    for name, value in model.unet.state_dict().items():
        assert torch.equal(state["model.diffusion_model." + name], value)
    assert not any(key.startswith("correspondence") for key in state)
    assert float(state["scale_factor"]) == 0.5
    # Round trip through import-ldm: same tensors, same configs.
    code, out, err = run(capsys, "weights", "import-ldm", "--config", str(export / "config.yaml"),
                         "--ckpt", str(export / "model.ckpt"), "-o", str(tmp_path / "back.safetensors"))
    assert code == 0, err
    back = load_checkpoint(tmp_path / "back.safetensors", expected_kind="ldm")
    ours = {k: v for k, v in load_checkpoint(tmp_path / "run" / "model.safetensors").tensors.items()
            if k.startswith(("first_stage.", "unet."))}
    assert back.tensors.keys() == ours.keys()
    assert all(torch.equal(back.tensors[key], ours[key]) for key in ours)
    # The LDM layout has no place for a KL first stage's unused codebook size or for how MIDMs
    # encodes KL latents (import-ldm sets the official "sample"): everything else comes back.
    expected = to_dict(config.autoencoder)
    if config.autoencoder.kind == "kl":
        expected.update(n_embed=0, posterior="sample")
    assert back.metadata["config"] == {
        "autoencoder": expected, "unet": to_dict(config.unet), "diffusion": to_dict(config.diffusion)}


def test_an_imported_ldm_exports_to_the_original_state_dict(tmp_path, capsys):
    """import-ldm then export-ldm gives back the original's first stage, UNet and betas."""
    configs = ldm_configs(ldm_yaml())
    original = original_ldm_state(configs, with_ema=False)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(ldm_yaml()))
    torch.save({"state_dict": original}, tmp_path / "model.ckpt")
    code, _, err = run(capsys, "weights", "import-ldm", "--config", str(tmp_path / "config.yaml"),
                       "--ckpt", str(tmp_path / "model.ckpt"), "-o", str(tmp_path / "ldm.safetensors"))
    assert code == 0, err
    code, _, err = run(capsys, "weights", "export-ldm", str(tmp_path / "ldm.safetensors"),
                       "-o", str(tmp_path / "x"))
    assert code == 0, err
    exported = torch.load(tmp_path / "x" / "model.ckpt", weights_only=True)["state_dict"]
    for key, value in original.items():
        weights = key.startswith(("first_stage_model.", "model.diffusion_model."))
        if weights or key in ("betas", "alphas_cumprod"):
            assert torch.allclose(exported[key], value), key


def test_export_refuses_a_file_of_another_kind(tmp_path, capsys):
    from midms_cli.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "other.safetensors", {"w": torch.zeros(1)}, {}, "state")
    code, _, err = run(capsys, "weights", "export-ldm", str(tmp_path / "other.safetensors"),
                       "-o", str(tmp_path / "x"))
    assert code == 2 and "export-ldm takes a midms model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
