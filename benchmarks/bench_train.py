"""Time and peak memory of one end-to-end training step (forward through the unrolled loop, all
losses, backward, AdamW), with and without UNet activation checkpointing.

Run: python benchmarks/bench_train.py --preset tiny             (seconds)
     python benchmarks/bench_train.py --preset paper-celebahq --steps 1   (many minutes, GBs of RAM)
Options: --phase e2e|warmup  --batch N  --steps N  --threads 2  --checkpointing off,on  --json FILE

Random weights and a synthetic batch. Each setting runs in a fresh subprocess, so its peak RSS
(VmHWM) is one training process's: model, optimizer state, activations. The loss network is the
preset's; VGG19 is built with random weights (its cost does not depend on the weights). Printed:
seconds per step, samples/s and peak RSS per setting, and the ratios of checkpointing on against
off measured in the same run (the baseline).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_table, machine_info, peak_rss_mb, randomize_zero_init, run_child  # noqa: E402


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


def child(args: argparse.Namespace) -> dict:
    """One setting in this process: build the objective as training does, run warm-up + timed steps."""
    from midms_cli.config import preset
    from midms_cli.models.feature_net import build_feature_net
    from midms_cli.models.midm import MIDM
    from midms_cli.models.vgg import VGG19Features
    from midms_cli.pipelines.train import MIDMsObjective, parameter_groups

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = preset(args.preset)
    training = config.training
    batch_size = args.batch or training.batch_size
    model = randomize_zero_init(MIDM(config))
    # Freezing and checkpointing as pipelines/train.py's build_task sets them for the phase.
    model.first_stage.requires_grad_(False)
    model.unet.requires_grad_(args.phase == "e2e")
    model.correspondence.requires_grad_(True)
    model.unet.activation_checkpointing = args.checkpointing == "on"
    losses = training.losses
    if losses.feature_net == "vgg19":
        feature_net = VGG19Features()
    else:
        feature_net = build_feature_net(losses, model.first_stage)
    objective = MIDMsObjective(model, feature_net, args.phase).train()
    optimizer = torch.optim.AdamW(parameter_groups(model, training, args.phase), betas=training.betas,
                                  weight_decay=training.weight_decay)
    batch = synthetic_batch(config, batch_size)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = objective(batch)["loss"]
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    step()  # warm-up: allocates gradients and optimizer state, creates kernels
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    seconds = min(times)
    return {"checkpointing": args.checkpointing, "phase": args.phase, "batch": batch_size,
            "seconds_per_step": seconds, "samples_per_second": batch_size / seconds,
            "peak_rss_mb": peak_rss_mb(), "loss": loss, "feature_net": losses.feature_net}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--phase", default="e2e", choices=("e2e", "warmup"))
    parser.add_argument("--batch", type=int, default=0, help="batch size (default: the preset's)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step (best kept)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpointing", default="off,on", help="comma list of off/on")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    info = machine_info(args.threads)
    print(f"machine: {info['cpu']}, {info['threads']} threads, torch {info['torch']}; "
          f"load avg {info['load_average_1min']:.1f}")
    print(f"preset {args.preset}, phase {args.phase}, random weights, synthetic batch, "
          f"best of {args.steps} step(s)\n")
    results = []
    for setting in [s for s in args.checkpointing.split(",") if s]:
        results.append(run_child([__file__, "--child", "--preset", args.preset, "--phase", args.phase,
                                  "--batch", str(args.batch), "--steps", str(args.steps),
                                  "--threads", str(args.threads), "--checkpointing", setting]))
    baseline = results[0]
    for result in results:
        result["time_vs_first"] = result["seconds_per_step"] / baseline["seconds_per_step"]
        result["memory_vs_first"] = result["peak_rss_mb"] / baseline["peak_rss_mb"]
    print(format_table(results, ["checkpointing", "batch", "seconds_per_step", "samples_per_second",
                                 "peak_rss_mb", "time_vs_first", "memory_vs_first", "feature_net"]))
    print(f"\n*_vs_first: ratio to checkpointing={baseline['checkpointing']} in this run")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "preset": args.preset, "results": results},
                                              indent=2))


if __name__ == "__main__":
    main()
