"""Batch throughput of translation: images per minute at batch 1, 4 and 8, one shared exemplar or
one exemplar per condition, against batch 1 of the same run.

Run: python benchmarks/bench_batch.py --preset tiny                   (seconds)
     python benchmarks/bench_batch.py --preset paper-celebahq --precision bf16   (minutes)
Options: --batches 1,4,8  --precision fp32|fp32-cl|bf16|bf16-all  --threads 2  --rounds 2  --json FILE

One process, random weights, the preset's sampler. Every (batch, exemplars) setting is timed
`--rounds` times, interleaved with the others (best kept), so the ratios share the machine's
load. Printed per setting: seconds per call, seconds per image, images per minute and the per-image
time against batch 1 (the target: at most 0.8 at batch 8), with the matmul rate before and after.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    apply_precision,
    format_table,
    machine_info,
    matmul_throughput,
    randomize_zero_init,
    verdict,
)

TARGET_BATCH8_PER_IMAGE = 0.8  # per-image time at batch 8 against batch 1


def inputs(config, batch: int, distinct: bool, seed: int = 1):
    """(conditions (B, nc, H, W), exemplars (1 or B, 3, H, W), their conditions)."""
    generator = torch.Generator().manual_seed(seed)
    size, channels = config.image_size, config.correspondence.cond_channels
    exemplars = batch if distinct else 1
    condition = (torch.rand(batch, channels, size, size, generator=generator) > 0.9).float()
    exemplar = torch.rand(exemplars, 3, size, size, generator=generator) * 2 - 1
    exemplar_condition = (torch.rand(exemplars, channels, size, size, generator=generator) > 0.9).float()
    return condition, exemplar, exemplar_condition


def run(args: argparse.Namespace) -> dict:
    from midms_cli.models.midm import MIDM
    from midms_cli.presets import preset
    from midms_cli.sampler import translate

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = apply_precision(randomize_zero_init(MIDM(preset(args.preset)).eval()), args.precision)
    batches = [int(b) for b in args.batches.split(",")]
    if batches[0] != 1:
        raise SystemExit("--batches must start with 1 (the baseline)")
    settings = [(b, distinct) for b in batches for distinct in ((False, True) if b > 1 else (False,))]
    data = {s: inputs(model.config, *s) for s in settings}
    with torch.no_grad():
        before = matmul_throughput(torch.float32) / 1e9
        model.decode(model.eps(model.unet, model.encode(data[settings[0]][1]), 249))  # warm-up
        best: dict[tuple[int, bool], float] = {}
        for _ in range(args.rounds):
            for setting in settings:
                condition, exemplar, exemplar_condition = data[setting]
                start = time.perf_counter()
                translate(model, condition, exemplar, exemplar_condition,
                          generator=torch.Generator().manual_seed(0))
                elapsed = time.perf_counter() - start
                best[setting] = min(best.get(setting, elapsed), elapsed)
        after = matmul_throughput(torch.float32) / 1e9
    per_image_1 = best[(1, False)]
    rows = []
    for (batch, distinct), seconds in best.items():
        per_image = seconds / batch
        rows.append({
            "batch": batch,
            "exemplars": "distinct" if distinct else "one",
            "seconds": seconds,
            "seconds_per_image": per_image,
            "images_per_minute": 60 / per_image,
            "per_image_vs_batch1": per_image / per_image_1,
        })
    return {"machine": machine_info(args.threads), "preset": args.preset, "precision": args.precision,
            "rounds": args.rounds, "matmul_fp32_gflops_before": before, "matmul_fp32_gflops_after": after,
            "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = run(args)
    print(json.dumps(result["machine"]))
    print(f"preset {args.preset}, precision {args.precision}, best of {args.rounds} interleaved rounds; "
          f"fp32 matmul {result['matmul_fp32_gflops_before']:.0f} GFLOP/s before, "
          f"{result['matmul_fp32_gflops_after']:.0f} after")
    print(format_table(result["rows"], ["batch", "exemplars", "seconds", "seconds_per_image",
                                        "images_per_minute", "per_image_vs_batch1"]))
    largest = max(result["rows"], key=lambda r: (r["batch"], r["exemplars"] == "distinct"))
    for row in result["rows"]:
        if row["batch"] == largest["batch"]:
            print(verdict(f"per-image time at batch {row['batch']} ({row['exemplars']} exemplar"
                          f"{'s' if row['exemplars'] == 'distinct' else ''}) vs batch 1",
                          row["per_image_vs_batch1"], TARGET_BATCH8_PER_IMAGE, "x"))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
