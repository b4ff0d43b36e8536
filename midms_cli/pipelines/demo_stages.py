"""The stages of `midms demo --train`: each takes the demo's options and returns (numbers, outputs).

Stages call the other pipelines' Python functions (never the CLI); `demo.run_stage` records them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from midms_cli.errors import MidmsError
from midms_cli.pipelines.demo import (
    BUNDLE_NAME,
    DATASET,
    IMAGE_SIZE,
    DemoOptions,
    command_line,
    data_dir,
    model_config,
    run_dir,
)

# --------------------------------------------------------------------------------------------
# Stages: each returns (numbers, outputs)


def stage_prepare(options: DemoOptions) -> tuple[dict[str, Any], dict[str, str]]:
    """Train shards with the demo seed; the held-out val split with seed + 1 (no shared faces)."""
    from midms_cli.data.registry import get_plugin
    from midms_cli.pipelines.prepare import PrepareConfig, prepare

    plugin = get_plugin(DATASET)
    profile, out = options.profile, data_dir(options.out)
    counts = {}
    for split, count, seed in (
        ("train", profile.train_count, options.seed),
        ("val", profile.eval_count, options.seed + 1),
    ):
        config = PrepareConfig(
            dataset=DATASET,
            out=out,
            size=IMAGE_SIZE,
            splits=(split,),
            limit=count,
            shard_size=256,
            seed=seed,
            options={"variant": profile.variant, f"{split}_count": count},
            command=f"midms prepare synthfaces --out {out} --size {IMAGE_SIZE} --split {split} "
            f"--limit {count} --shard-size 256 --seed {seed} --variant {profile.variant} "
            f"--{split}-count {count}",
        )
        with options.bar(f"prepare {split}", count) as advance:
            result = prepare(
                config, plugin, progress=lambda _split, done, _total: advance(done), report=options.log
            )
        counts[f"{split}_samples"] = result["splits"][split]["count"]
    return counts, {"data": str(out)}


def _pretrain(options: DemoOptions, kind: str) -> tuple[dict[str, Any], dict[str, str]]:
    from midms_cli.pipelines.pretrain import PretrainConfig, pretrain

    profile = options.profile
    iters = profile.autoencoder_iters if kind == "autoencoder" else profile.diffusion_iters
    lr = profile.autoencoder_lr if kind == "autoencoder" else profile.diffusion_lr
    config = PretrainConfig(
        model=kind,
        lr=lr,
        batch_size=profile.batch_size,
        max_iters=iters,
        amp=profile.amp,
        checkpoint_every=max(10, min(250, iters)),
        sample_every=0,
        seed=2021 + options.seed,
    )
    autoencoder = run_dir(options.out, "autoencoder") if kind == "diffusion" else None
    result = pretrain(
        kind,
        data_dir(options.out),
        run_dir(options.out, kind),
        model_config(profile),
        config,
        autoencoder=autoencoder,
        device_name=options.device,
        progress=options.show_progress,
        extra={"command": command_line(), "demo_stage": kind},
    )
    return _loop_numbers(result), {"run": str(run_dir(options.out, kind))}


def _loop_numbers(result: Any) -> dict[str, Any]:
    if result.interrupted:
        raise KeyboardInterrupt  # the loop saved a checkpoint; the stage is not finished
    return {"steps": result.step, **{k: round(v, 5) for k, v in result.last_losses.items()}}


def stage_autoencoder(options: DemoOptions) -> tuple[dict[str, Any], dict[str, str]]:
    """The VQ first stage on the training images (no LDM weights exist here)."""
    return _pretrain(options, "autoencoder")


def stage_diffusion(options: DemoOptions) -> tuple[dict[str, Any], dict[str, str]]:
    """The unconditional latent UNet on the frozen first stage's latents."""
    return _pretrain(options, "diffusion")


def warmup_base(options: DemoOptions) -> Path:
    """The warm-up's base model: the autoencoder stage's first stage and an untrained UNet.

    The warm-up trains the correspondence networks on decoded warps and never runs the UNet, so it
    needs only the first stage: it can run while the diffusion stage pretrains the UNet, and the
    end-to-end stage joins the two (`train_init`).
    """
    from midms_cli.checkpoint import save_modules
    from midms_cli.ldm_import import KIND as LDM_KIND
    from midms_cli.models.unet import UNetModel
    from midms_cli.pipelines.pretrain import ldm_config, load_first_stage

    path = options.out / "runs" / "warmup-base.safetensors"
    if not path.is_file():
        config = model_config(options.profile)
        first_stage = load_first_stage(run_dir(options.out, "autoencoder"), config)
        torch.manual_seed(2021 + options.seed)
        save_modules(
            path,
            {"first_stage": first_stage, "unet": UNetModel(config.unet)},
            ldm_config(config, with_unet=True),
            LDM_KIND,
            {"trained_by": "midms demo: autoencoder stage's first stage, untrained UNet"},
        )
    return path


def train_init(options: DemoOptions) -> Path:
    """The end-to-end stage's starting model: the warm-up's correspondence networks and first stage,
    with the diffusion stage's UNet. Both stages must share the autoencoder stage's first stage."""
    from midms_cli.ldm_import import load_ldm
    from midms_cli.pipelines.translate import load_midm, resolve_model_file, save_midm

    path = options.out / "runs" / "train-init.safetensors"
    if path.is_file():
        return path
    model = load_midm(resolve_model_file(run_dir(options.out, "warmup")), "cpu")
    _, modules = load_ldm(resolve_model_file(run_dir(options.out, "diffusion")))
    for name, tensor in modules["first_stage"].state_dict().items():
        if not torch.equal(tensor, model.first_stage.state_dict()[name]):
            raise MidmsError(
                f"the warm-up and diffusion stages of {options.out} used different first stages "
                f"({name} differs); delete {run_dir(options.out, 'warmup')} and rerun the demo"
            )
    model.unet.load_state_dict(modules["unet"].state_dict())
    save_midm(
        path, model, {"trained_by": "midms demo: warm-up correspondence with the diffusion stage's UNet"}
    )
    return path


def stage_warmup(options: DemoOptions) -> tuple[dict[str, Any], dict[str, str]]:
    """Warm-up: the correspondence networks alone, on warps decoded without diffusion."""
    from midms_cli.pipelines.train import warmup

    out = run_dir(options.out, "warmup")
    result = warmup(data_dir(options.out), out, model_config(options.profile), base=warmup_base(options),
                    device_name=options.device, extra={"command": command_line()},
                    progress=options.show_progress)  # fmt: skip
    return _loop_numbers(result), {"run": str(out)}


def stage_train(options: DemoOptions) -> tuple[dict[str, Any], dict[str, str]]:
    """End-to-end recurrent training through the profile's sampler, from the warm-up and the UNet."""
    from midms_cli.pipelines.train import train

    out = run_dir(options.out, "train")
    result = train(data_dir(options.out), out, model_config(options.profile), init=train_init(options),
                   device_name=options.device, extra={"command": command_line()},
                   progress=options.show_progress)  # fmt: skip
    return _loop_numbers(result), {"run": str(out), "model": str(out / "model.safetensors")}


def _exported_model(options: DemoOptions) -> Any:
    from midms_cli.devices import resolve_device
    from midms_cli.pipelines.translate import load_midm

    return load_midm(options.out / BUNDLE_NAME, resolve_device(options.device))


def held_out_samples(out: Path, count: int) -> list[dict[str, Any]]:
    """The first `count` samples of the held-out split, in order."""
    from midms_cli.data.shards import iterate_samples

    samples = []
    for sample in iterate_samples(data_dir(out), "val", strict=True):
        samples.append(sample)
        if len(samples) == count:
            break
    return samples


def stage_translate(options: DemoOptions) -> tuple[dict[str, Any], dict[str, str]]:
    """The first `grid` held-out pairs: condition | exemplar | output | oracle, captioned."""
    from midms_cli.pipelines.showcase import translation_grid

    samples = held_out_samples(options.out, options.profile.grid)
    path = options.out / "grid.png"
    quick = options.profile.name == "quick"
    title = f"{options.profile.name} profile" + (": a few steps per stage, expect noise" if quick else "")
    translation_grid(_exported_model(options), samples, path, options.seed, title)
    return {"pairs": len(samples)}, {"grid": str(path)}


def stage_evaluate(options: DemoOptions) -> tuple[dict[str, Any], dict[str, str]]:
    """Oracle PSNR/L1 and SWD of the model and of the two baselines on the held-out pairs
    (FID, LPIPS and the VGG metrics join only when their weights were added)."""
    from midms_cli.devices import resolve_device
    from midms_cli.metrics import select_metrics
    from midms_cli.pipelines.evaluate import evaluate_model

    out = options.out / "eval"
    chosen = select_metrics(None, has_oracle=True, report=options.log)
    count = options.profile.eval_count
    with options.bar("evaluate", count * options.profile.eval_seeds) as advance:
        evaluation = evaluate_model(
            options.out / BUNDLE_NAME,
            data_dir(options.out),
            split="val",
            out_dir=out,
            metrics=chosen,
            limit=count,
            seed=options.seed,
            baselines=True,
            seeds=options.profile.eval_seeds,
            diversity=2 if "lpips" in chosen else 0,
            batch_size=16,
            device=resolve_device(options.device),
            report=options.log,
            progress=advance,
            notes=profile_notes(options.profile),
        )
    return headline_numbers(evaluation["results"]), {
        "report": str(out / "report.html"),
        "results": str(out / "results.json"),
    }


HEADLINE_KEYS = (
    "oracle_output_psnr",
    "oracle_output_l1",
    "part_colour_error",
    "swd_oracle",
    "swd",
    "fid",
    "lpips_diversity",
)


def profile_notes(profile: Any) -> list[str]:
    """What a reader of the report must know about the run before reading its numbers."""
    if profile.name == "quick":
        return [
            "Quick profile: a few optimizer steps per stage, to check the pipeline runs. Its outputs are "
            "noise by design; `midms demo` shows the bundled model instead."
        ]
    return []


def headline_numbers(results: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of every method (model, ablations, baselines), flat and rounded:
    "<method>.<metric>", with "oracle_output_" shortened to "oracle_"."""
    numbers: dict[str, Any] = {}
    for name, values in results["methods"].items():
        for key in HEADLINE_KEYS:
            if key in values:
                numbers[f"{name}.{key.replace('oracle_output_', 'oracle_')}"] = round(float(values[key]), 4)
    return numbers


def stage_export(options: DemoOptions) -> tuple[dict[str, Any], dict[str, str]]:
    """The trained model as one inference file (float16 weights keep the bundled model small), with
    the profile's sampler: the one it trained with unless the profile ships another."""
    from midms_cli.model_export import export_model

    path = options.out / BUNDLE_NAME
    export_model(
        run_dir(options.out, "train") / "model.safetensors",
        path,
        half=options.profile.half_precision_export,
        sampling=dict(options.profile.export_sampler),
        trained_by=command_line(),
        extra_metadata={
            "demo_profile": options.profile.name,
            "demo_seed": options.seed,
            "dataset": f"synthfaces variant={options.profile.variant} size={IMAGE_SIZE}",
        },
    )
    return {"megabytes": round(path.stat().st_size / 2**20, 2)}, {"model": str(path)}


STAGE_FUNCTIONS: dict[str, Callable[[DemoOptions], tuple[dict[str, Any], dict[str, str]]]] = {
    "prepare": stage_prepare,
    "autoencoder": stage_autoencoder,
    "diffusion": stage_diffusion,
    "warmup": stage_warmup,
    "train": stage_train,
    "translate": stage_translate,
    "evaluate": stage_evaluate,
    "export": stage_export,
}
