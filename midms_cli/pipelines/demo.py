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
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from midms_cli.atomic import write_text
from midms_cli.config import ModelConfig, rewarp_positions_within, validate
from midms_cli.errors import MidmsError
from midms_cli.presets import preset

DATASET = "synthfaces"
IMAGE_SIZE = 64  # the tiny preset: 64 px images, 16 x 16 latents
# The export comes before translate and evaluate: the grid and the numbers are those of the exported file.
STAGES = ("prepare", "autoencoder", "diffusion", "warmup", "train", "export", "translate", "evaluate")
BUNDLE_NAME = "midms-tiny.safetensors"
PLAN_FILE = "demo.json"
# Raised whenever the same profile would train differently, so that a folder of an older version is
# refused instead of finished with mixed stages. 2: the profile's sampler also trains. 3: the warm-up
# starts from the first stage alone and the end-to-end stage joins it with the diffusion stage's UNet.
PLAN_VERSION = 3
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
    # UNetConfig fields over the preset's: the latent UNet the diffusion stage pretrains.
    unet: dict[str, Any] = field(default_factory=dict)
    eval_seeds: int = 1  # noise seeds of the evaluate stage (mean and sd over them)
    # SamplingConfig fields over the trained sampler in the exported file only (empty: ship what trained).
    export_sampler: dict[str, Any] = field(default_factory=dict)


PROFILES: dict[str, DemoProfile] = {
    profile.name: profile
    for profile in (
        DemoProfile("quick", "smoke run: a few steps per stage (about 1 CPU-minute)", 64, 16,
                    30, 40, 10, 4, batch_size=4, grid=3),
        DemoProfile("full", "the demo (about 10 minutes on 2 CPU cores)", 1024, 100,
                    1500, 800, 100, 30),
        DemoProfile("bundle", "the first part of the bundled model midms-tiny (longer training)", 4096, 200,
                    3000, 8000, 1500, 120, unet={"model_channels": 64}, eval_seeds=3,
                    sampler={"refine": "none", "tau": 0.02, "ddim_steps": 32},
                    # On 64 tuning pairs (val split of seed 7) the trained re-warps cost 0.8 dB oracle
                    # PSNR and raised SWD vs the oracles from 33.8 to 47.2: its iteration encoder had only
                    # the 120 end-to-end steps. The file samples the same 4 steps without them.
                    export_sampler={"rewarp_positions": ()}),
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
    config.unet = dataclasses.replace(config.unet, **profile.unet)
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
        if stored != json.loads(json.dumps(wanted)):  # compared as stored: tuples become lists
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
    from midms_cli.pipelines.demo_stages import STAGE_FUNCTIONS

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
