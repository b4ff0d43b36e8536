"""The work a translation does, counted end to end (spec 1.12, architecture 8): at the official
settings one image costs 24 UNet calls, one encode of its exemplar and one decode, and an
exemplar is encoded once however many conditions use it.

Counted with global forward hooks on the module classes, so the counts hold for models that the
pipeline and the CLI build themselves from a model file. Complements tests/test_sampler.py,
which counts inside `translate` on a hand-built model.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import pytest
import torch
from typer.testing import CliRunner

from midms_cli.cli.app import app, main
from midms_cli.conditions.io import save_condition
from midms_cli.images import save_png
from midms_cli.models.autoencoder import Decoder, Encoder
from midms_cli.models.correspondence import FeatureEncoder
from midms_cli.models.midm import MIDM
from midms_cli.models.unet import UNetModel
from midms_cli.pipelines.translate import save_midm
from midms_cli.presets import preset
from midms_cli.sampler import translate

OFFICIAL_UNET_CALLS = 4 + 20  # interleaved steps + refinement (spec 1.6, 1.11)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids oversubscription when other suites share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextmanager
def count_calls():
    """Count forward calls per module class (and the batch size of each UNet call), process-wide."""
    calls: Counter[str] = Counter()
    unet_batches: list[int] = []

    def hook(module, args, _output):
        name = type(module).__name__
        calls[name] += 1
        if isinstance(module, UNetModel):
            unet_batches.append(int(args[0].shape[0]))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield calls, unet_batches
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return MIDM(preset("tiny")).eval()


def test_a_batch_of_conditions_costs_one_batched_unet_pass_per_step_and_one_encode(tiny_model):
    torch.manual_seed(1)
    conditions = (torch.rand(3, 15, 64, 64) > 0.9).float()
    exemplar, exemplar_condition = torch.rand(1, 3, 64, 64) * 2 - 1, (torch.rand(1, 15, 64, 64) > 0.9).float()
    with count_calls() as (calls, unet_batches):
        result = translate(tiny_model, conditions, exemplar, exemplar_condition,
                           generator=torch.Generator().manual_seed(0))
    assert result.image.shape == (3, 3, 64, 64)
    # 24 UNet calls for the whole batch, each on all three latents (not 24 per condition).
    assert calls[UNetModel.__name__] == OFFICIAL_UNET_CALLS
    assert unet_batches == [3] * OFFICIAL_UNET_CALLS
    assert calls[Encoder.__name__] == 1 and calls[Decoder.__name__] == 1
    # RealEnc once (the exemplar), SegEnc once (the batch), IterEnc at the two re-warp positions.
    assert calls[FeatureEncoder.__name__] == 1 + 1 + 2


@pytest.mark.parametrize("precision", ["fp32", "fp32-cl", "bf16"])
def test_cli_translation_from_a_model_file_does_only_the_work_the_outputs_need(tiny_model, tmp_path,
                                                                              precision):
    model_file = tmp_path / "tiny.safetensors"
    save_midm(model_file, tiny_model)
    torch.manual_seed(2)
    save_png(torch.rand(3, 64, 64) * 2 - 1, tmp_path / "face.png")
    save_condition((torch.rand(15, 64, 64) > 0.9).float(), tmp_path / "face_edges.npy")
    lines = []
    for index in range(3):
        save_condition((torch.rand(15, 64, 64) > 0.9).float(), tmp_path / f"cond{index}.npy")
        lines.append(f"cond{index}.npy face.png face_edges.npy")
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")

    with count_calls() as (calls, _):
        result = CliRunner().invoke(app, ["translate", "--pairs", str(tmp_path / "pairs.txt"),
                                          "--out-dir", str(tmp_path / "out"), "--model", str(model_file),
                                          "--precision", precision])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "out").glob("*.png"))) == 3
    # Per image: 24 UNet calls and one decode; the shared exemplar is encoded once for all three.
    assert calls[UNetModel.__name__] == 3 * OFFICIAL_UNET_CALLS
    assert calls[Decoder.__name__] == 3
    assert calls[Encoder.__name__] == 1


def test_cli_rejects_an_unknown_precision_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["translate", "a.png", "b.png", "--precision", "fp8"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--precision 'fp8': choose one of fp32, fp32-cl, bf16" in err
