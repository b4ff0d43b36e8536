"""Model files read straight into parameters: the same weights as `load_modules`, in the compute
dtype of the precision, and the same one-line errors for files that do not fit."""

from __future__ import annotations

import pytest
import torch

from midms_cli.checkpoint import load_modules, save_checkpoint, save_modules
from midms_cli.errors import MidmsError
from midms_cli.models.midm import MIDM
from midms_cli.models.model_file import midm_from_file
from midms_cli.presets import preset


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model saved once in float32 and once in float16 (as the demo exports it)."""
    root = tmp_path_factory.mktemp("model_file")
    torch.manual_seed(0)
    model = MIDM(preset("tiny")).eval()
    save_modules(root / "fp32.safetensors", model.modules_to_save(), model.config, "midms")
    half = {f"{prefix}.{name}": (t.half() if t.is_floating_point() else t)
            for prefix, module in model.modules_to_save().items() for name, t in module.state_dict().items()}
    save_checkpoint(root / "fp16.safetensors", half, {"config": model.config.to_dict()}, "midms")
    return root, model


def reference(path, config):
    """The plain way: build, then copy the file's tensors into the float32 parameters."""
    model = MIDM(config)
    load_modules(path, model.modules_to_save())
    return model.eval()


@pytest.mark.parametrize("stored", ["fp32", "fp16"])
def test_same_parameters_and_buffers_as_the_plain_loader(saved, stored):
    root, model = saved
    path = root / f"{stored}.safetensors"
    loaded, expected = midm_from_file(path, model.config), reference(path, model.config)
    got, want = dict(loaded.named_parameters()), dict(expected.named_parameters())
    assert got.keys() == want.keys()
    for name, tensor in got.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, want[name]), name
        assert tensor.requires_grad == want[name].requires_grad, name
    for name, tensor in expected.named_buffers():
        assert torch.equal(dict(loaded.named_buffers())[name], tensor), name
    assert not loaded.training and loaded.precision == "fp32"
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.encode(image), expected.encode(image))


def test_bf16_reads_the_unet_into_bfloat16_and_the_rest_into_float32(saved):
    root, model = saved
    loaded = midm_from_file(root / "fp32.safetensors", model.config, precision="bf16")
    for name, tensor in loaded.unet.named_parameters():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, dict(model.unet.named_parameters())[name].detach().bfloat16()), name
    assert {t.dtype for t in loaded.first_stage.parameters()} == {torch.float32}
    assert {t.dtype for t in loaded.correspondence.parameters()} == {torch.float32}


def test_a_file_for_another_config_is_refused_by_name(saved, tmp_path):
    root, model = saved
    other = preset("tiny")
    other.unet.model_channels *= 2
    with pytest.raises(MidmsError, match=r"fp32.safetensors does not match the 'unet' model .*size mismatch"):
        midm_from_file(root / "fp32.safetensors", other)
    partial = tmp_path / "partial.safetensors"
    save_modules(partial, {"unet": model.unet, "first_stage": model.first_stage}, model.config, "midms")
    with pytest.raises(MidmsError, match="holds no weights for 'correspondence'"):
        midm_from_file(partial, model.config)
    extra = tmp_path / "extra.safetensors"
    tensors = {f"{p}.{n}": t for p, m in model.modules_to_save().items() for n, t in m.state_dict().items()}
    tensors["unet.surplus"] = torch.zeros(2)
    save_checkpoint(extra, tensors, {"config": model.config.to_dict()}, "midms")
    with pytest.raises(MidmsError, match=r"unexpected key\(s\) in state_dict: surplus"):
        midm_from_file(extra, model.config)


def test_channels_last_precisions_are_laid_out_while_reading(saved, monkeypatch):
    """set_precision then finds every weight in place: Module.to makes no copy of any of them."""
    root, model = saved
    loaded = midm_from_file(root / "fp32.safetensors", model.config, precision="fp32-cl")
    for network in (loaded.unet, loaded.first_stage):
        pointers = {name: p.data_ptr() for name, p in network.named_parameters()}
        loaded.set_precision("fp32-cl")
        assert pointers == {name: p.data_ptr() for name, p in network.named_parameters()}
        weights = [p for p in network.parameters() if p.dim() == 4]
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    for name, tensor in loaded.named_parameters():
        assert torch.equal(tensor, dict(model.named_parameters())[name]), name


def _inputs(config):
    generator = torch.Generator().manual_seed(3)
    channels, size = config.correspondence.cond_channels, config.image_size
    cond = (torch.rand(1, channels, size, size, generator=generator) > 0.9).float()
    ref = torch.rand(1, 3, size, size, generator=generator) * 2 - 1
    ref_cond = (torch.rand(1, channels, size, size, generator=generator) > 0.9).float()
    return cond, ref, ref_cond


@pytest.mark.parametrize(("refine", "precision"), [("none", "fp32"), ("finetuned", "fp32"), ("none", "bf16")])
def test_staged_weights_translate_as_the_whole_model_with_one_network_at_a_time(saved, refine, precision):
    import dataclasses

    from midms_cli.models.model_file import PHASE_NETWORKS, StagedWeights
    from midms_cli.sampler import translate

    root, model = saved
    path = root / "fp32.safetensors"
    whole = midm_from_file(path, model.config, precision=precision)
    staged = StagedWeights(path, model.config, "cpu", precision)
    assert staged.resident == set() and all(p.is_meta for p in staged.model.parameters())
    sampling = dataclasses.replace(model.config.sampling, refine=refine)
    seen = []

    def enter(phase):
        staged.enter(phase)
        seen.append((phase, set(staged.resident)))
        for prefix, network in staged.networks.items():  # the others hold no storage
            assert all(p.is_meta != (prefix in PHASE_NETWORKS[phase]) for p in network.parameters()), prefix

    cond, ref, ref_cond = _inputs(model.config)
    expected = translate(
        whole, cond, ref, ref_cond, sampling=sampling, generator=torch.Generator().manual_seed(1)
    )
    got = translate(staged.model, cond, ref, ref_cond, sampling=sampling,
                    generator=torch.Generator().manual_seed(1), phases=enter)
    assert torch.equal(got.image, expected.image) and torch.equal(got.latent, expected.latent)
    phases = ["encode", "condition", "loop"] + (["refine"] if refine == "finetuned" else []) + ["decode"]
    assert [phase for phase, _ in seen] == phases
    assert seen[-1][1] == {"first_stage"} and staged.model.device == torch.device("cpu")
    staged.enter("loop")  # every weight as the whole model holds it: values, dtype and strides
    resident = {name: t for name, t in staged.model.named_parameters() if not t.is_meta}
    assert any(name.startswith("unet.") for name in resident)
    for name, tensor in whole.named_parameters():
        if name in resident:
            got = resident[name]
            assert got.dtype == tensor.dtype and got.stride() == tensor.stride(), name
            assert torch.equal(got, tensor), name


def test_staged_weights_check_every_entry_before_reading_any(saved, tmp_path):
    from midms_cli.models.model_file import StagedWeights

    root, model = saved
    other = preset("tiny")
    other.correspondence.channels *= 2
    with pytest.raises(MidmsError, match="does not match the 'correspondence' model built from this config"):
        StagedWeights(root / "fp32.safetensors", other, "cpu", "fp32")
