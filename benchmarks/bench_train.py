"""Time and peak memory of one end-to-end training step (forward through the unrolled loop, all
losses, backward, AdamW) under memory-saving settings.

Run: python benchmarks/bench_train.py --preset tiny             (seconds)
     python benchmarks/bench_train.py --preset paper-celebahq --steps 1   (many minutes, GBs of RAM)
Options: --phase e2e|warmup  --batch N  --steps N  --threads 2  --settings LIST  --json FILE

A setting is activation checkpointing `none`, `unet` (the UNet's blocks only) or `all` (the UNet's
and the frozen decoder's blocks, what `training.activation_checkpointing` turns on), optionally
with `+amp`: the forward pass under autocast in the device's mixed-precision dtype (bfloat16 on
CPUs with native bfloat16 and on CUDA; `training.amp`), as the training loop runs it.

Random weights and a synthetic batch. Each setting runs in a fresh subprocess, so its peak memory
is one training process's: model, optimizer state, activations. On CPU that is the peak RSS
(VmHWM); on CUDA `torch.cuda.max_memory_allocated`, the same code path. The loss network is the
preset's; VGG19 is built with random weights (its cost does not depend on the weights). Printed:
seconds per step, samples/s and peak memory per setting, and the ratios against the first
setting measured in the same run (the baseline), with the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    format_table,
    machine_info,
    matmul_throughput,
    peak_rss_mb,
    randomize_zero_init,
    run_child,
)


def synthetic_batch(config, batch: int, seed: int = 1) -> dict:
    """A training batch of the shard layout: image, cond, ref, ref_cond."""
    generator = torch.Generator().manual_seed(seed)
    size, channels = config.image_size, config.correspondence.cond_channels

    def image():
        return torch.rand(batch, 3, size, size, generator=generator) * 2 - 1

    def condition():
        return (torch.rand(batch, channels, size, size, generator=generator) > 0.9).float()

    return {"image": image(), "cond": condition(), "ref": image(), "ref_cond": condition(),
            "meta": [{} for _ in range(batch)]}


CHECKPOINTING = ("none", "unet", "all")


def parse_setting(setting: str) -> tuple[str, bool]:
    """"all+amp" -> ("all", True)."""
    checkpointing, *flags = setting.split("+")
    if checkpointing not in CHECKPOINTING or any(flag != "amp" for flag in flags):
        raise SystemExit(f"unknown setting {setting!r}: {'|'.join(CHECKPOINTING)}, optionally +amp")
    return checkpointing, bool(flags)


def child(args: argparse.Namespace) -> dict:
    """One setting in this process: build the objective as training does, run warm-up + timed steps."""
    from midms_cli.devices import autocast_dtype
    from midms_cli.models.feature_net import build_feature_net
    from midms_cli.models.midm import MIDM
    from midms_cli.models.vgg import VGG19Features
    from midms_cli.pipelines.objective import MIDMsObjective
    from midms_cli.pipelines.train import parameter_groups
    from midms_cli.presets import preset

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    random.seed(0)  # the diffusion-loss position k*: the same step in every setting
    checkpointing, amp = parse_setting(args.settings)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp_dtype = autocast_dtype(device) if amp else None
    config = preset(args.preset)
    training = config.training
    batch_size = args.batch or training.batch_size
    model = randomize_zero_init(MIDM(config))
    # Freezing and checkpointing as pipelines/train.py's build_task sets them for the phase.
    model.first_stage.requires_grad_(False)
    model.unet.requires_grad_(args.phase == "e2e")
    model.correspondence.requires_grad_(True)
    model.set_activation_checkpointing(checkpointing == "all")
    model.unet.activation_checkpointing = checkpointing != "none"
    losses = training.losses
    if losses.feature_net == "vgg19":
        feature_net = VGG19Features()
    else:
        feature_net = build_feature_net(losses, model.first_stage)
    objective = MIDMsObjective(model, feature_net, args.phase).to(device).train()
    optimizer = torch.optim.AdamW(parameter_groups(model, training, args.phase), betas=training.betas,
                                  weight_decay=training.weight_decay)
    batch = synthetic_batch(config, batch_size)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = objective(batch)["loss"]
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        return float(loss.detach())

    # The optimizer state exists from here on, as in every step after the first: one zero-gradient
    # step allocates it (changing random weights by weight decay only), so even a single timed step
    # shows the steady-state peak. With --steps 1 that step also pays one-off kernel creation.
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    seconds = min(times)
    if device.type == "cuda":
        peak, measure = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
    else:
        peak, measure = peak_rss_mb(), "peak_rss"
    return {"setting": args.settings, "checkpointing": checkpointing,
            "autocast": str(amp_dtype).replace("torch.", "") if amp_dtype else "off",
            "phase": args.phase, "batch": batch_size, "seconds_per_step": seconds,
            "samples_per_second": batch_size / seconds, "peak_memory_mb": peak, "memory_measure": measure,
            "loss": loss, "feature_net": losses.feature_net}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--phase", default="e2e", choices=("e2e", "warmup"))
    parser.add_argument("--batch", type=int, default=0, help="batch size (default: the preset's)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (best kept)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--settings", default="unet,all,all+amp",
                        help="comma list of none|unet|all, each optionally +amp (the first is the baseline)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    info = machine_info(args.threads)
    for setting in args.settings.split(","):
        parse_setting(setting)
    print(f"machine: {info['cpu']}, {info['threads']} threads, torch {info['torch']}; "
          f"load avg {info['load_average_1min']:.1f} before")
    torch.set_num_threads(args.threads)
    rate_before = matmul_throughput(torch.float32) / 1e9
    print(f"fp32 matmul {rate_before:.0f} GFLOP/s before")
    print(f"preset {args.preset}, phase {args.phase}, random weights, synthetic batch, "
          f"best of {args.steps} step(s)\n")
    results = []
    for setting in [s for s in args.settings.split(",") if s]:
        results.append(run_child([__file__, "--child", "--preset", args.preset, "--phase", args.phase,
                                  "--batch", str(args.batch), "--steps", str(args.steps),
                                  "--threads", str(args.threads), "--settings", setting]))
        results[-1]["load_average_after"] = os.getloadavg()[0]
        print(f"  {setting}: {results[-1]['seconds_per_step']:.1f} s/step, "
              f"{results[-1]['peak_memory_mb']:.0f} MiB peak", flush=True)  # kept if a later setting fails
    baseline = results[0]
    for result in results:
        result["time_vs_first"] = result["seconds_per_step"] / baseline["seconds_per_step"]
        result["memory_vs_first"] = result["peak_memory_mb"] / baseline["peak_memory_mb"]
    print(format_table(results, ["setting", "batch", "seconds_per_step", "samples_per_second",
                                 "peak_memory_mb", "time_vs_first", "memory_vs_first", "loss",
                                 "load_average_after"]))
    rate_after = matmul_throughput(torch.float32) / 1e9
    loaded = "; times not comparable: rate below 300 GFLOP/s (machine loaded)"
    print(f"\nfp32 matmul {rate_before:.0f} GFLOP/s before, {rate_after:.0f} after; load avg "
          f"{os.getloadavg()[0]:.1f} after" + (loaded if min(rate_before, rate_after) < 300 else ""))
    print(f"peak memory: {baseline['memory_measure']}; feature net {baseline['feature_net']}; "
          f"*_vs_first: ratio to setting {baseline['setting']} in this run")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "preset": args.preset, "results": results,
                                               "matmul_gflops_before_after": [rate_before, rate_after]},
                                              indent=2))


if __name__ == "__main__":
    main()
