"""Throughput of the synthfaces generator on CPU: training pairs per minute at 64 px.

Run: python benchmarks/bench_synthfaces.py [--size 64] [--count 200] [--threads 1]
Reports pairs/minute for each variant and, as the same-run baseline, the cost of one plain
`render` (a pair renders the sample, the exemplar, and the two geometry-only condition pictures,
plus the condition recipe), so the ratio is comparable across machines.
"""

from __future__ import annotations

import argparse
import time

import torch
from midms_plugins.synthfaces.generator import appearance_of, geometry_of, make_pair, render

PAIRINGS = ("easy", "hard", "self")


def time_per_call(fn, count: int) -> float:
    fn(0)  # warm-up (kornia and torch first-call overheads)
    start = time.perf_counter()
    for index in range(count):
        fn(index)
    return (time.perf_counter() - start) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    baseline = time_per_call(lambda i: render(geometry_of(i, 0), appearance_of(i, 0), args.size), args.count)
    print(f"render only        {60 / baseline:9.0f} images/min  ({baseline * 1e3:.2f} ms)")
    for variant in ("official", "canny"):
        per_pair = time_per_call(
            lambda i, v=variant: make_pair(i, 0, args.size, v, PAIRINGS[i % 3]), args.count
        )
        print(f"make_pair {variant:8s} {60 / per_pair:9.0f} pairs/min   ({per_pair * 1e3:.2f} ms, "
              f"{per_pair / baseline:.1f}x one render)")  # fmt: skip


if __name__ == "__main__":
    main()
