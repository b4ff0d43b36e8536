"""`midms demo`: the whole MIDMs pipeline, tiny, on generated synthfaces, on a CPU.

Stages in order: prepare shards (train, and a held-out val split generated with another seed),
pretrain the autoencoder and the latent UNet, warm up the correspondence networks, train end to
end, translate a (condition x exemplar) grid, evaluate against the oracle and two baselines, and
export the model file. Each stage calls the other pipelines' Python functions (never the CLI) and,
when finished, writes its record `OUT/stages/<stage>.json` atomically; running the demo again on
the same folder skips every stage whose record exists (the training stages also resume mid-way).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from midms_cli.atomic import write_text
from midms_cli.config import ModelConfig, preset, rewarp_positions_within, validate
from midms_cli.errors import MidmsError
from midms_cli.images import save_png

DATASET = "synthfaces"
IMAGE_SIZE = 64  # the tiny preset: 64 px images, 16 x 16 latents
# The export comes before translate and evaluate: the grid and the numbers are those of the exported file.
STAGES = ("prepare", "autoencoder", "diffusion", "warmup", "train", "export", "translate", "evaluate")
BUNDLE_NAME = "midms-tiny.safetensors"
PLAN_FILE = "demo.json"
# Raised whenever the same profile would train differently, so that a folder of an older version is
# refused instead of finished with mixed stages. 2: the profile's sampler also trains.
PLAN_VERSION = 2
SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class DemoProfile:
    """How much data and how many optimizer steps each stage gets (same code path for all)."""

    name: str
    summary: str
    train_count: int  # generated training pairs
    eval_count: int  # held-out pairs (val split, generated with seed + 1)
    autoencoder_iters: int
    diffusion_iters: int
    warmup_iters: int
    train_iters: int  # end-to-end iterations after the warm-up
    batch_size: int = 8
    autoencoder_lr: float = 2e-4  # 4e-4 and above stall the tiny first stage near the mean image
    diffusion_lr: float = 4e-4
    amp: bool = True  # pretraining in bfloat16 where the hardware has it (CUDA, AVX512-BF16/AMX CPUs)
    grid: int = 4  # the translation grid shows grid conditions x grid exemplars
    variant: str = "canny"  # synthfaces condition; canny is computable from any exemplar photo
    half_precision_export: bool = True  # float16 weights keep the exported file small
    # SamplingConfig fields over the preset's (official) sampler: the end-to-end phase trains the loop
    # they describe, the warm-up warps with their τ, and the exported model samples with them.
    sampler: dict[str, Any] = field(default_factory=dict)


PROFILES: dict[str, DemoProfile] = {
    profile.name: profile
    for profile in (
        DemoProfile("quick", "smoke run: a few steps per stage (about 1 CPU-minute)", 64, 16,
                    30, 40, 10, 4, batch_size=4, grid=3),
        DemoProfile("full", "the demo (about 10 minutes on 2 CPU cores)", 1024, 100,
                    1500, 800, 100, 30),
        # Sampler chosen on 48 tuning pairs (synthfaces val, seed 7; not the 200 evaluation pairs): the
        # short-trained UNet loses detail at every denoising step, so one interleaved step at noise level
        # 1/32, with the confidence mask, without the refinement and with the softer warp τ = 0.02,
        # scored best (README, "The bundled model"); the run trains with it as well.
        DemoProfile("bundle", "the bundled model midms-tiny (longer training)", 2048, 200,
                    3000, 3000, 900, 100,
                    sampler={"refine": "none", "interleaved_steps": 1, "ddim_steps": 32, "tau": 0.02}),
    )
}


# --------------------------------------------------------------------------------------------
# Progress hooks (the CLI passes rich bars; Python callers get none by default)

Advance = Callable[[int], None]


@contextlib.contextmanager
def no_bar(description: str, total: int) -> Iterator[Advance]:
    """The default progress hook: shows nothing."""
    yield lambda n: None


@dataclass
class DemoOptions:
    out: Path
    profile: DemoProfile
    seed: int = 0
    device: str = "auto"
    show_progress: bool = True  # the training loop's own bars
    bar: Callable[[str, int], contextlib.AbstractContextManager[Advance]] = no_bar
    log: Callable[[str], None] = lambda message: None


@dataclass
class StageRecord:
    stage: str
    seconds: float
    numbers: dict[str, Any]
    outputs: dict[str, str]
    skipped: bool = False  # finished by an earlier run of the demo


# --------------------------------------------------------------------------------------------
# Layout of the output folder


def data_dir(out: Path) -> Path:
    return out / "data"


def run_dir(out: Path, stage: str) -> Path:
    return out / "runs" / stage


def stage_file(out: Path, stage: str) -> Path:
    return out / "stages" / f"{stage}.json"


def model_config(profile: DemoProfile) -> ModelConfig:
    """The tiny preset with the demo's step counts (warm-up + end-to-end = max_iters)."""
    config = preset("tiny")
    training = config.training
    training.batch_size = profile.batch_size
    training.warmup_iters = profile.warmup_iters
    training.max_iters = profile.warmup_iters + profile.train_iters
    # Few steps: checkpoint often enough that an interrupted stage loses little, sample at the end only.
    training.checkpoint_every = max(10, min(100, profile.train_iters))
    training.sample_every = 0
    sampling = dataclasses.replace(config.sampling, **profile.sampler)
    positions = rewarp_positions_within(sampling.rewarp_positions, sampling.interleaved_steps)
    config.sampling = dataclasses.replace(sampling, rewarp_positions=positions)
    validate(config)  # a profile whose sampler a model file could not hold fails before any training
    return config


def plan(options: DemoOptions) -> dict[str, Any]:
    """What a demo folder was made with; a rerun with other settings is refused, not mixed."""
    return {"version": PLAN_VERSION, "profile": asdict(options.profile), "seed": options.seed,
            "dataset": DATASET, "image_size": IMAGE_SIZE}


def check_plan(out: Path, wanted: dict[str, Any]) -> None:
    path = out / PLAN_FILE
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
        except json.JSONDecodeError:
            stored = None
        if stored != wanted:
            raise MidmsError(f"{out} holds a demo run with other settings (profile, seed or midms version); "
                             "use another --out or delete that folder")
    else:
        write_text(path, json.dumps(wanted, indent=2, sort_keys=True) + "\n")


def command_line() -> str:
    """The invocation, recorded in every run's config and in the exported model's metadata."""
    if Path(sys.argv[0]).name in ("midms", "__main__.py"):
        return " ".join(["midms", *sys.argv[1:]])
    return " ".join(sys.argv)


# --------------------------------------------------------------------------------------------
# Stages: each returns (numbers, outputs)


def stage_prepare(options: DemoOptions) -> tuple[dict[str, Any], dict[str, str]]:
    """Train shards with the demo seed; the held-out val split with seed + 1 (no shared faces)."""
    from midms_cli.data.registry import get_plugin
    from midms_cli.pipelines.prepare import PrepareConfig, prepare

    plugin = get_plugin(DATASET)
    profile, out = options.profile, data_dir(options.out)
    counts = {}
    for split, count, seed in (("train", profile.train_count, options.seed),
                               ("val", profile.eval_count, options.seed + 1)):
        config = PrepareConfig(
            dataset=DATASET, out=out, size=IMAGE_SIZE, splits=(split,), limit=count, shard_size=256,
            seed=seed, options={"variant": profile.variant, f"{split}_count": count},
            command=f"midms prepare synthfaces --out {out} --size {IMAGE_SIZE} --split {split} "
                    f"--limit {count} --shard-size 256 --seed {seed} --variant {profile.variant} "
                    f"--{split}-count {count}",
        )
        with options.bar(f"prepare {split}", count) as advance:
            result = prepare(config, plugin, progress=lambda _split, done, _total: advance(done),
                             report=options.log)
        counts[f"{split}_samples"] = result["splits"][split]["count"]
    return counts, {"data": str(out)}


def _pretrain(options: DemoOptions, kind: str) -> tuple[dict[str, Any], dict[str, str]]:
    from midms_cli.pipelines.pretrain import PretrainConfig, pretrain

    profile = options.profile
    iters = profile.autoencoder_iters if kind == "autoencoder" else profile.diffusion_iters
    lr = profile.autoencoder_lr if kind == "autoencoder" else profile.diffusion_lr
    config = PretrainConfig(model=kind, lr=lr, batch_size=profile.batch_size, max_iters=iters,
                            amp=profile.amp, checkpoint_every=max(10, min(250, iters)), sample_every=0,
                            seed=2021 + options.seed)
    autoencoder = run_dir(options.out, "autoencoder") if kind == "diffusion" else None
    result = pretrain(kind, data_dir(options.out), run_dir(options.out, kind), model_config(profile), config,
                      autoencoder=autoencoder, device_name=options.device, progress=options.show_progress,
                      extra={"command": command_line(), "demo_stage": kind})
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


def stage_warmup(options: DemoOptions) -> tuple[dict[str, Any], dict[str, str]]:
    """Spec 2.1 warm-up: correspondence networks only, UNet frozen."""
    from midms_cli.pipelines.train import warmup

    out = run_dir(options.out, "warmup")
    result = warmup(data_dir(options.out), out, model_config(options.profile),
                    base=run_dir(options.out, "diffusion"), device_name=options.device,
                    extra={"command": command_line()}, progress=options.show_progress)
    return _loop_numbers(result), {"run": str(out)}


def stage_train(options: DemoOptions) -> tuple[dict[str, Any], dict[str, str]]:
    """Spec 2.2 end-to-end recurrent training from the warm-up."""
    from midms_cli.pipelines.train import train

    out = run_dir(options.out, "train")
    result = train(data_dir(options.out), out, model_config(options.profile),
                   init=run_dir(options.out, "warmup"), device_name=options.device,
                   extra={"command": command_line()}, progress=options.show_progress)
    return _loop_numbers(result), {"run": str(out), "model": str(out / "model.safetensors")}


def _trained_model(options: DemoOptions) -> Any:
    from midms_cli.pipelines.translate import load_midm

    return load_midm(run_dir(options.out, "train") / "model.safetensors", "cpu")


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


def condition_picture(condition: Tensor) -> Tensor:
    """A condition (C, H, W) in [0, 1] shown as an image in [-1, 1] (channel 0, black edges on white)."""
    return (1 - condition[:1]).expand(3, -1, -1) * 2 - 1


def translation_grid(conditions: Tensor, exemplars: Tensor, outputs: Tensor) -> Tensor:
    """(3, (n+1)H, (m+1)W): exemplars along the top, conditions down the left, output (i, j) in the cells.

    conditions (n, 3, H, W) and exemplars (m, 3, H, W) as pictures in [-1, 1]; outputs (n, m, 3, H, W).
    """
    corner = torch.ones_like(exemplars[0])
    top = torch.cat([corner, *exemplars], dim=2)
    rows = [torch.cat([conditions[i], *outputs[i]], dim=2) for i in range(conditions.shape[0])]
    return torch.cat([top, *rows], dim=1)


@torch.no_grad()
def stage_translate(options: DemoOptions) -> tuple[dict[str, Any], dict[str, str]]:
    """Every held-out condition of the first `grid` samples in the style of every exemplar."""
    from midms_cli.sampler import translate

    model = _exported_model(options)
    device = next(model.parameters()).device
    count = options.profile.grid
    samples = held_out_samples(options.out, count)
    conditions = torch.stack([s["cond"] for s in samples]).to(device)
    outputs = []
    with options.bar("translate grid", count) as advance:
        for sample in samples:
            generator = torch.Generator(device=device).manual_seed(options.seed)
            exemplar, exemplar_condition = sample["ref"][None].to(device), sample["ref_cond"][None].to(device)
            result = translate(model, conditions, exemplar, exemplar_condition, generator=generator)
            outputs.append(result.image.cpu())
            advance(1)
    outputs_by_condition = torch.stack(outputs, dim=1)  # (conditions, exemplars, 3, H, W)
    grid = translation_grid(torch.stack([condition_picture(s["cond"]) for s in samples]),
                            torch.stack([s["ref"] for s in samples]), outputs_by_condition)
    path = options.out / "grid.png"
    save_png(grid, path)
    return {"pairs": count * count}, {"grid": str(path)}


def stage_evaluate(options: DemoOptions) -> tuple[dict[str, Any], dict[str, str]]:
    """Oracle PSNR/L1 and SWD of the model and of the two baselines on the held-out pairs
    (FID, LPIPS and the VGG metrics join only when their weights were added)."""
    from midms_cli.devices import resolve_device
    from midms_cli.metrics import select_metrics
    from midms_cli.pipelines.evaluate import evaluate_model

    out = options.out / "eval"
    chosen = select_metrics(None, has_oracle=True, report=options.log)
    count = options.profile.eval_count
    with options.bar("evaluate", count) as advance:
        evaluation = evaluate_model(
            options.out / BUNDLE_NAME, data_dir(options.out), split="val",
            out_dir=out, metrics=chosen, limit=count, seed=options.seed, baselines=True,
            diversity=2 if "lpips" in chosen else 0, batch_size=16, device=resolve_device(options.device),
            report=options.log, progress=advance,
        )
    return headline_numbers(evaluation["results"]), {"report": str(out / "report.html"),
                                                      "results": str(out / "results.json")}


def headline_numbers(results: dict[str, Any]) -> dict[str, Any]:
    """Oracle PSNR / L1 and SWD of the model and the baselines, flat and rounded."""
    numbers: dict[str, Any] = {}
    model = results.get("model", results)
    baselines = results.get("baselines", {})
    rows = {"model": model, **{name: value for name, value in baselines.items()}}
    for name, values in rows.items():
        for key in ("oracle_output_psnr", "oracle_output_l1", "swd", "fid", "lpips_diversity"):
            if key in values:
                numbers[f"{name}.{key.replace('oracle_output_', 'oracle_')}"] = round(float(values[key]), 4)
    return numbers


def stage_export(options: DemoOptions) -> tuple[dict[str, Any], dict[str, str]]:
    """The trained model as one inference file (float16 weights: the bundled model stays < 10 MB)."""
    from midms_cli.checkpoint import save_modules

    model = _trained_model(options)  # trained with the profile's sampler, which it keeps
    if options.profile.half_precision_export:
        model = copy.deepcopy(model).half()
    path = options.out / BUNDLE_NAME
    save_modules(path, model.modules_to_save(), model.config, "midms",
                 {"trained_by": command_line(), "demo_profile": options.profile.name,
                  "demo_seed": options.seed,
                  "dataset": f"synthfaces variant={options.profile.variant} size={IMAGE_SIZE}"})
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


# --------------------------------------------------------------------------------------------
# The driver


def read_record(out: Path, stage: str) -> StageRecord | None:
    path = stage_file(out, stage)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return StageRecord(data["stage"], float(data["seconds"]), data["numbers"], data["outputs"],
                           skipped=True)
    except (json.JSONDecodeError, KeyError, TypeError):
        return None  # a record we cannot read is redone, not trusted


def run_stage(options: DemoOptions, stage: str) -> StageRecord:
    """Run one stage unless its record exists; the record is written only when the stage finished."""
    done = read_record(options.out, stage)
    if done is not None:
        options.log(f"{stage}: done in an earlier run, skipped")
        return done
    options.log(f"[bold]{stage}[/bold]")
    start = time.perf_counter()
    numbers, outputs = STAGE_FUNCTIONS[stage](options)
    record = StageRecord(stage, round(time.perf_counter() - start, 2), numbers, outputs)
    data = asdict(record)
    data.pop("skipped")
    write_text(stage_file(options.out, stage), json.dumps(data, indent=2, sort_keys=True) + "\n")
    return record


def run_demo(options: DemoOptions) -> dict[str, Any]:
    """Run every stage (skipping finished ones); returns the summary also written to OUT/summary.json."""
    options.out.mkdir(parents=True, exist_ok=True)
    check_plan(options.out, plan(options))
    start = time.perf_counter()
    records = [run_stage(options, stage) for stage in STAGES]
    summary = {
        "out": str(options.out),
        "profile": options.profile.name,
        "seed": options.seed,
        "seconds": round(time.perf_counter() - start, 2),
        "stages": [asdict(record) for record in records],
        "report": str(options.out / "eval" / "report.html"),
        "grid": str(options.out / "grid.png"),
        "model": str(options.out / BUNDLE_NAME),
    }
    write_text(options.out / SUMMARY_FILE, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary
