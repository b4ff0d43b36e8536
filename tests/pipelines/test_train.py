"""MIDMs warm-up and end-to-end training (spec 2.1-2.3) on synthfaces shards, tiny preset at 32 px."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from midms_cli.checkpoint import load_checkpoint, module_state, save_modules
from midms_cli.config import LossConfig, ModelConfig
from midms_cli.data.shards import make_loader
from midms_cli.models.autoencoder import build_autoencoder
from midms_cli.models.feature_net import FirstStageFeatures
from midms_cli.models.midm import MIDM
from midms_cli.models.unet import UNetModel
from midms_cli.pipelines import objective
from midms_cli.pipelines import train as pipeline
from midms_cli.pipelines.loop import seed_everything
from midms_cli.pipelines.pretrain import ldm_config
from midms_cli.presets import preset

SIZE = 32


def synthfaces_shards(base: Path) -> Path:
    """16 training samples in 2 shards at 32 px, made once per session (shared by the training tests)."""
    out = base / "training-shards"
    if not (out / "train" / "index.json").is_file():
        from midms_plugins.synthfaces import PLUGIN

        from midms_cli.pipelines.prepare import PrepareConfig, prepare

        prepare(PrepareConfig(dataset="synthfaces", out=out, size=SIZE, splits=("train",), limit=16,
                              shard_size=8), PLUGIN)
    return out


def tiny32(**training) -> ModelConfig:
    config = preset("tiny")
    config.image_size = SIZE
    config.autoencoder.resolution = SIZE
    config.unet.image_size = SIZE // config.autoencoder.downsample
    # The official loss weights, and no resize, crop or flip unless a test asks (the preset's load
    # size belongs to its 64 px images).
    config.training.losses.perceptual = LossConfig().perceptual
    for name, value in {"batch_size": 2, "sample_every": 0, "checkpoint_every": 1000, "log_every": 1,
                        "load_size": 0, "flip": False, **training}.items():
        setattr(config.training, name, value)
    return ModelConfig.from_dict(config.to_dict())


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    return synthfaces_shards(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> Path:
    """An `ldm` file with a randomly initialised tiny first stage and UNet (what --base reads)."""
    path = tmp_path_factory.getbasetemp() / "base-ldm.safetensors"
    config = tiny32()
    torch.manual_seed(0)
    save_modules(path, {"first_stage": build_autoencoder(config.autoencoder), "unet": UNetModel(config.unet)},
                 ldm_config(config, with_unet=True), "ldm")
    return path


@pytest.fixture(scope="session")
def batch(shards) -> dict:
    return next(iter(make_loader(shards, "train", 2, shuffle=False, resample=False)))


def _model(base: Path) -> MIDM:
    torch.manual_seed(1)
    return pipeline.model_from_base(tiny32(), base)


def _objective(model: MIDM, phase: str) -> objective.MIDMsObjective:
    return objective.MIDMsObjective(model, FirstStageFeatures(model.first_stage), phase)


def _has_grad(module: torch.nn.Module) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_warmup_trains_only_the_initial_matching_networks(base, batch):
    model = _model(base)
    model.unet.requires_grad_(False)  # as build_task does for the warm-up
    terms = _objective(model, "warmup")(batch)
    assert set(terms) == {"domain", "cycle", "diffusion", "source", "perceptual", "loss"}
    assert terms["loss"].item() == pytest.approx(
        sum(v.item() for k, v in terms.items() if k != "loss"), rel=1e-5
    )
    terms["loss"].backward()
    corr = model.correspondence
    for part in (corr.seg_enc, corr.real_enc, corr.layer, corr.theta, corr.phi):
        assert _has_grad(part)
    # No re-warp happens in warm-up, so IterEnc gets nothing (spec 2.1); UNet and first stage are frozen.
    assert not _has_grad(corr.iter_enc)
    assert all(p.grad is None for p in model.unet.parameters())
    assert all(p.grad is None for p in model.first_stage.parameters())


def test_e2e_phase_sends_gradients_through_the_unrolled_loop(base, batch):
    model = _model(base)
    # Spectral norm takes a power-iteration step in every training forward: the warm-up pass below
    # starts from the same state, so the two initial cycle losses are computed with the same weights.
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    torch.manual_seed(2)
    terms = _objective(model, "e2e")(batch)
    assert set(terms) == {
        "domain",
        "cycle",
        "cycle_iterative",
        "diffusion",
        "source",
        "perceptual",
        "contextual",
        "loss",
    }
    terms["loss"].backward()
    assert _has_grad(model.unet)
    assert _has_grad(model.correspondence.iter_enc)  # only reachable through the re-warps
    assert all(p.grad is None for p in model.first_stage.parameters())
    # The warm-up counts the initial cycle loss twice (as the official code does), the e2e phase once.
    model.load_state_dict(state)
    with torch.no_grad():
        warm = _objective(model, "warmup")(batch)
    assert warm["cycle"].item() == pytest.approx(2 * terms["cycle"].item(), rel=1e-5)


def _constant_losses(monkeypatch) -> list[str]:
    """Every loss function of `midms_cli.losses` returns 1 and records its name: the objective's
    terms then show the spec 2.3 weights and which losses each phase computes."""
    called: list[str] = []
    names = ("domain_alignment_loss", "cycle_consistency_loss", "source_condition_loss",
             "perceptual_loss", "contextual_style_loss", "diffusion_loss_x0", "diffusion_loss_eps",
             "self_warp_reconstruction_loss", "warped_segmentation_loss")
    for name in names:
        monkeypatch.setattr(objective.losses, name,
                            lambda *args, name=name, **kwargs: (called.append(name), torch.tensor(1.0))[1])
    return called


@pytest.mark.parametrize(
    ("phase", "expected", "diffusion_loss"),
    [
        # Warm-up: the initial cycle counts twice (spec 5.13), Eq. 17 is the self-warp MSE (6'),
        # no contextual loss.
        ("warmup", {"domain": 10, "cycle": 2, "diffusion": 1, "source": 1, "perceptual": 0.002},
         "self_warp_reconstruction_loss"),
        # E2E: 2 re-warps on each of the exemplar and GT paths give 4 iterative cycle terms (2b).
        ("e2e", {"domain": 10, "cycle": 1, "cycle_iterative": 4, "diffusion": 1, "source": 1,
                 "perceptual": 0.002, "contextual": 1}, "diffusion_loss_x0"),
    ],
)
def test_loss_terms_and_weights_of_each_phase_follow_spec_2_3(base, batch, monkeypatch, phase, expected,
                                                              diffusion_loss):
    called = _constant_losses(monkeypatch)
    model = _model(base)
    with torch.no_grad():
        terms = _objective(model, phase)(batch)
    assert {k: pytest.approx(v.item()) for k, v in terms.items() if k != "loss"} == expected
    assert terms["loss"].item() == pytest.approx(sum(expected.values()))
    assert diffusion_loss in called and "warped_segmentation_loss" not in called


@pytest.mark.parametrize(
    "position, noised, queried", [(0, 311, 249), (1, 249, 187), (2, 187, 125), (3, 125, 63)]
)
def test_diffusion_branch_noises_one_grid_point_earlier_than_it_queries(
    base, monkeypatch, position, noised, queried
):
    """Spec 2.3 #6 with the official 17-point grid: q-sample at the preceding point, UNet at the step's t."""
    config = tiny32()
    config.sampling.interleaved_steps = 4
    model = MIDM(config)
    seen = {}
    original_q = objective.q_sample

    def q_sample(x0, t, noise, table):
        seen.update(noised=int(t), noise=noise, a_noise=float(table[t]))
        return original_q(x0, t, noise, table)

    def eps(unet, x, t):
        seen["queried"] = int(t)
        return torch.zeros_like(x)  # a UNet that predicts no noise

    monkeypatch.setattr(objective, "q_sample", q_sample)
    monkeypatch.setattr(model, "eps", eps)
    z = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    loss = objective.diffusion_branch(model, z, position, "x0")
    assert (seen["noised"], seen["queried"]) == (noised, queried)
    # x0-space (official): with ε̂ = 0, x̂0 = z_t / sqrt(ᾱ_queried),
    # where z_t = sqrt(ᾱ_noised) z + sqrt(1 - ᾱ_noised) ε.
    a_q = float(model.alphas_cumprod[queried])
    z_t = seen["a_noise"] ** 0.5 * z + (1 - seen["a_noise"]) ** 0.5 * seen["noise"]
    assert loss.item() == pytest.approx(float(((z_t / a_q**0.5 - z) ** 2).mean()), rel=1e-9)
    # ε-space (the paper's Eq. 17): MSE(0, ε).
    eps_loss = objective.diffusion_branch(model, z, position, "eps")
    assert eps_loss.item() == pytest.approx(float((seen["noise"] ** 2).mean()), rel=1e-9)


@pytest.mark.parametrize(("phase", "offset", "e2e_lr"),
                         [("warmup", 0, 0.0), ("e2e", 7, 0.0), ("e2e", 60, 0.0), ("warmup", 0, 2e-5),
                          ("e2e", 7, 2e-5)])
def test_optimizer_groups_and_epoch_milestones(base, phase, offset, e2e_lr):
    """Spec 2.4: AdamW (wd 0.05) with the correspondence and UNet groups at their own learning rates;
    MultiStepLR milestones in epochs become optimizer steps, counted from the start of the phase;
    a milestone the warm-up passed (offset 60 = epoch 12) has already lowered the learning rate.
    lr_correspondence_e2e, when set, replaces the correspondence rate of the end-to-end phase only."""
    config = tiny32(lr_correspondence=3e-6, lr_correspondence_e2e=e2e_lr, lr_unet=1.5e-7,
                    milestones=(10, 12, 14, 24), gamma=0.3)
    model = pipeline.model_from_base(config, base)
    task = pipeline.build_task(model, phase, {}, steps_per_epoch=5, offset=offset)
    optimizer = task.optimizers["midms"]
    assert isinstance(optimizer, torch.optim.AdamW)
    groups = {g["name"]: g for g in optimizer.param_groups}
    steps = [50, 60, 70, 120]  # epochs (10, 12, 14, 24) x 5 steps per epoch
    decay = 0.3 ** sum(s <= offset for s in steps)
    correspondence = e2e_lr if phase == "e2e" and e2e_lr > 0 else 3e-6
    expected = {"correspondence": correspondence * decay}
    if phase == "e2e":
        expected["unet"] = 1.5e-7 * decay
    assert {name: g["lr"] for name, g in groups.items()} == pytest.approx(expected)
    assert all(g["weight_decay"] == 0.05 and g["betas"] == (0.9, 0.999) for g in groups.values())
    owners = {"correspondence": model.correspondence, "unet": model.unet}
    for name, group in groups.items():
        assert {id(p) for p in group["params"]} == {id(p) for p in owners[name].parameters()}
    assert all(p.requires_grad == (phase == "e2e") for p in model.unet.parameters())
    assert sorted(task.schedulers["midms"].milestones) == [s - offset for s in steps if s > offset]
    assert task.schedulers["midms"].gamma == pytest.approx(0.3)


def _oracle_error(model: MIDM, batch: dict) -> float:
    """L1 between the initial warp R0 and the latent of the oracle (condition geometry, exemplar looks)."""
    model.eval()
    with torch.no_grad():
        warped = objective.initial_matches(model, batch).warped
        return float((warped - model.encode(batch["oracle"])).abs().mean())


def test_warmup_lowers_the_oracle_warp_error_and_leaves_the_unet_alone(shards, base, tmp_path):
    eval_batch = next(iter(make_loader(shards, "train", 8, shuffle=False, resample=False)))
    config = tiny32(warmup_iters=60, batch_size=4, lr_correspondence=3e-3)
    out = tmp_path / "warm"
    result = pipeline.warmup(shards, out, config, base, progress=False)
    assert result.step == 60 and result.final_model == out / "model.safetensors"
    torch.manual_seed(config.training.seed)  # the same initial correspondence weights the run started from
    before = pipeline.model_from_base(tiny32(), base)
    after = pipeline.model_from_midms(tiny32(), out)
    assert _oracle_error(after, eval_batch) < 0.85 * _oracle_error(before, eval_batch)
    trained, original = load_checkpoint(out / "model.safetensors"), load_checkpoint(base)
    assert trained.kind == "midms"
    for prefix in ("unet", "first_stage"):
        for name, tensor in module_state(original, prefix).items():
            assert torch.equal(module_state(trained, prefix)[name], tensor), f"{prefix}.{name} changed"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "contextual" not in metrics[0] and "cycle_iterative" not in metrics[0]


def test_warmup_in_epochs_runs_one_pass_over_the_data_and_records_the_steps(shards, base, tmp_path):
    """The paper's warm-up is measured in epochs: 16 samples at batch 8 make 2 steps per epoch."""
    out = tmp_path / "warm-epochs"
    config = tiny32(warmup_iters=50, warmup_epochs=1, batch_size=8)
    result = pipeline.warmup(shards, out, config, base, progress=False)
    assert result.step == 2 and not result.interrupted
    recorded = json.loads((out / "config.json").read_text())["training"]
    assert (recorded["warmup_iters"], recorded["warmup_epochs"]) == (2, 0)  # a resume counts steps
    again = pipeline.warmup(shards, out, config, base, progress=False)  # finished: nothing more to do
    assert again.step == 2


def test_training_batches_get_the_configs_resize_crop_and_flip(shards, base, tmp_path, monkeypatch):
    from midms_cli.data import shards as shard_module

    seen = []
    make_loader_unpatched = shard_module.make_loader

    def recording(*args, **kwargs):
        seen.append((kwargs["load_size"], kwargs["flip"], kwargs["self_pair_window"]))
        return make_loader_unpatched(*args, **kwargs)

    monkeypatch.setattr(shard_module, "make_loader", recording)
    config = tiny32(warmup_iters=1, load_size=SIZE + 4, flip=True, self_pair_window="own")
    assert pipeline.warmup(shards, tmp_path / "aug", config, base, progress=False).step == 1
    config = tiny32(warmup_iters=1)
    assert pipeline.warmup(shards, tmp_path / "plain", config, base, progress=False).step == 1
    assert seen == [(SIZE + 4, True, "own"), (None, False, "shared")]


def test_train_without_init_warms_up_first_then_updates_unet_and_correspondence(shards, base, tmp_path):
    out = tmp_path / "run"
    config = tiny32(warmup_iters=1, max_iters=3, lr_unet=1e-3, activation_checkpointing=True, sample_every=2)
    result = pipeline.train(shards, out, config, base=base, progress=False)
    assert result.step == 2 and not result.interrupted  # 3 total - 1 warm-up
    warm = load_checkpoint(out / "warmup" / "model.safetensors")
    final = load_checkpoint(out / "model.safetensors")
    assert final.kind == "midms"
    for prefix in ("unet", "correspondence"):
        assert not all(
            torch.equal(module_state(final, prefix)[k], v) for k, v in module_state(warm, prefix).items()
        )
    assert all(
        torch.equal(module_state(final, "first_stage")[k], v)
        for k, v in module_state(warm, "first_stage").items()
    )
    # The file alone rebuilds the model (what `midms translate --model` does).
    model = MIDM(ModelConfig.from_dict(final.metadata["config"]))
    for prefix, module in model.modules_to_save().items():
        module.load_state_dict(module_state(final, prefix))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"contextual", "cycle_iterative", "lr_correspondence", "lr_unet"} <= set(metrics[-1])
    assert metrics[-1]["lr_unet"] == pytest.approx(1e-3)  # the UNet's own parameter group
    # Sample grid: condition | exemplar | initial warp | output | ground truth, one row per sample.
    from PIL import Image

    assert Image.open(out / "samples" / "step-00000002.png").size == (5 * SIZE, 2 * SIZE)


def test_warmup_cli_dry_run_shows_overrides(shards, base, tmp_path):
    from typer.testing import CliRunner

    from midms_cli.cli.app import app

    result = CliRunner().invoke(
        app,
        [
            "warmup",
            "--data",
            str(shards),
            "--base",
            str(base),
            "--out",
            str(tmp_path / "w"),
            "--iters",
            "5",
            "--lr",
            "0.01",
            "--epochs",
            "2",
            "--dry-run",
        ],
    )
    assert result.exit_code == 0, result.output
    config = json.loads(result.stdout)
    assert config["training"]["warmup_iters"] == 5 and config["training"]["lr_correspondence"] == 0.01
    assert config["training"]["warmup_epochs"] == 2
    assert config["run"]["phase"] == "warmup"
    assert not (tmp_path / "w").exists()


def test_train_cli_learning_rates_are_per_phase(shards, base, tmp_path):
    """`midms train --lr-correspondence` sets the end-to-end rate, `--warmup-lr` the warm-up's."""
    from typer.testing import CliRunner

    from midms_cli.cli.app import app

    args = ["train", "--data", str(shards), "--base", str(base), "--out", str(tmp_path / "t"), "--dry-run"]
    result = CliRunner().invoke(app, [*args, "--lr-correspondence", "5e-5", "--warmup-lr", "0.002"])
    assert result.exit_code == 0, result.output
    training = json.loads(result.stdout)["training"]
    assert (training["lr_correspondence_e2e"], training["lr_correspondence"]) == (5e-5, 0.002)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    training = json.loads(result.stdout)["training"]
    assert (training["lr_correspondence_e2e"], training["lr_correspondence"]) == (1e-5, 1e-3)  # tiny preset
    assert not (tmp_path / "t").exists()


def test_train_needs_a_starting_point(shards, tmp_path):
    from midms_cli.errors import MidmsError

    with pytest.raises(MidmsError, match="--init"):
        pipeline.train(shards, tmp_path / "x", tiny32(), progress=False)


def test_vgg_losses_without_weights_fail_before_any_work(shards, base, tmp_path, monkeypatch):
    from midms_cli.errors import MidmsError

    monkeypatch.setenv("MIDMS_HOME", str(tmp_path / "empty-home"))
    config = tiny32()
    config.training.losses.feature_net = "vgg19"
    with pytest.raises(MidmsError, match="midms weights add vgg19"):
        pipeline.warmup(shards, tmp_path / "w", config, base, progress=False)
    assert not (tmp_path / "w").exists()


def test_e2e_killed_and_resumed_ends_with_the_parameters_of_an_uninterrupted_run(shards, base, tmp_path):
    """The e2e phase draws noise and k* at random: resume must replay exactly the same draws."""
    import os
    import signal

    init = tmp_path / "init.safetensors"
    save_modules(init, _model(base).modules_to_save(), tiny32(), "midms")
    config = tiny32(warmup_iters=0, max_iters=2)

    def kill_at_one(step: int) -> None:
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    pipeline.run_phase("e2e", shards, tmp_path / "straight", config, init=init, progress=False)
    stopped = pipeline.run_phase("e2e", shards, tmp_path / "resumed", config, init=init, progress=False,
                                 on_step=kill_at_one)
    assert stopped.interrupted and stopped.step == 1
    pipeline.run_phase("e2e", shards, tmp_path / "resumed", config, init=init, progress=False)
    a = load_checkpoint(tmp_path / "straight" / "model.safetensors").tensors
    b = load_checkpoint(tmp_path / "resumed" / "model.safetensors").tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_activation_checkpointing_gives_the_same_gradients(base, batch, monkeypatch):
    """Checkpointing trades memory for time only: the e2e loss and UNet gradients are unchanged."""
    from midms_cli.models import unet as unet_module

    calls = []
    original = unet_module.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(unet_module, "checkpoint", counting)
    grads = []
    for checkpointing in (False, True):
        model = _model(base)
        model.unet.activation_checkpointing = checkpointing
        seed_everything(3)  # noise and the diffusion-loss position k*
        terms = _objective(model, "e2e")(batch)
        terms["loss"].backward()
        grads.append((terms["loss"].item(), torch.cat([p.grad.flatten() for p in model.unet.parameters()])))
    assert calls  # the second pass really recomputed blocks
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-7)


def test_warmup_cli_continues_a_models_correspondence_with_its_stored_config(shards, base, tmp_path):
    """`midms warmup --init MODEL --config MODEL`: the model's own config (sampler included), its
    correspondence weights trained further, its UNet and first stage unchanged."""
    from typer.testing import CliRunner

    from midms_cli.cli.app import app

    first = tmp_path / "first"
    config = tiny32(warmup_iters=2, batch_size=4)
    config.sampling.tau = 0.037  # not the preset's: must come from the model file
    pipeline.warmup(shards, first, config, base, progress=False)
    model_file = first / "model.safetensors"
    out = tmp_path / "again"
    args = ["warmup", "--data", str(shards), "--init", str(model_file), "--config", str(model_file),
            "--out", str(out), "--iters", "2", "--lr", "0.002"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    stored = json.loads((out / "config.json").read_text())
    assert stored["sampling"]["tau"] == 0.037 and stored["training"]["lr_correspondence"] == 0.002
    assert stored["run"]["init"] == str(model_file) and stored["run"]["base"] is None
    before, after = load_checkpoint(model_file), load_checkpoint(out / "model.safetensors")
    for prefix in ("unet", "first_stage"):
        for name, tensor in module_state(before, prefix).items():
            assert torch.equal(module_state(after, prefix)[name], tensor), f"{prefix}.{name} changed"
    moved = [name for name, tensor in module_state(before, "correspondence").items()
             if not torch.equal(module_state(after, "correspondence")[name], tensor)]
    assert moved, "the correspondence networks were not trained"


@pytest.mark.parametrize("extra", [[], ["--base", "BASE", "--init", "BASE"]])
def test_warmup_cli_needs_exactly_one_of_base_and_init(shards, base, tmp_path, capsys, extra):
    from midms_cli.cli.app import main

    args = ["warmup", "--data", str(shards), "--out", str(tmp_path / "w"),
            *[str(base) if a == "BASE" else a for a in extra]]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert "exactly one of --base" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_warmup_base_may_be_a_midms_model_whose_backbone_is_kept(shards, base, tmp_path):
    """--base MODEL: the model's first stage and UNet, new correspondence networks of the config's
    architecture (here wider than the model's own)."""
    first = tmp_path / "first"
    pipeline.warmup(shards, first, tiny32(warmup_iters=1, batch_size=4), base, progress=False)
    model_file = first / "model.safetensors"
    config = tiny32(warmup_iters=1, batch_size=4)
    config.correspondence.channels = 48
    out = tmp_path / "wider"
    pipeline.warmup(shards, out, config, model_file, progress=False)
    before, after = load_checkpoint(model_file), load_checkpoint(out / "model.safetensors")
    for prefix in ("unet", "first_stage"):
        for name, tensor in module_state(before, prefix).items():
            assert torch.equal(module_state(after, prefix)[name], tensor), f"{prefix}.{name} changed"
    assert module_state(after, "correspondence")["theta.weight"].shape[0] == 48
    assert module_state(before, "correspondence")["theta.weight"].shape[0] != 48
