"""Peak memory of one soft warp (Eq. 6) at a 64x64 latent: chunked attention vs the naive 4096x4096 matrix.

Run: python benchmarks/bench_warp_memory.py [--size 64] [--channels 256] [--chunk 1024]
Both variants run in the same process on the same inputs, under torch's profiler with
profile_memory=True; the peak is the highest running total of CPU bytes the profiler saw
allocated during the call (inputs excluded). Printed: each peak in MiB and naive / chunked, for
inference (no grad) and for a training step (forward + backward), plus the largest difference
between the two results so the saving is not bought with a different answer.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from midms_cli.matching import correlation, soft_warp


def naive_warp(value: torch.Tensor, f_x: torch.Tensor, f_y: torch.Tensor, tau: float) -> torch.Tensor:
    """The release's way: materialise C (HW x HW), softmax it, multiply."""
    corr = correlation(f_x, f_y)  # (B, HW, HW)
    weights = torch.softmax(corr / tau, dim=-1)
    warped = torch.bmm(weights, value.flatten(2).transpose(1, 2))
    return warped.transpose(1, 2).reshape(value.shape[0], value.shape[1], *f_x.shape[-2:])


def peak_bytes(fn) -> int:
    """Highest running total of CPU allocations during fn(), relative to the start."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as scratch:
        trace = Path(scratch) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = [
            e["args"] for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"
        ]
    if not events:
        return 0
    start = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - start


def training_step(warp, value, f_x, f_y, tau):
    def run():
        out = warp(value, f_x, f_y, tau)
        out.square().mean().backward()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="latent height = width")
    parser.add_argument("--channels", type=int, default=256, help="matching feature channels")
    parser.add_argument("--chunk", type=int, default=1024, help="query rows per chunk")
    parser.add_argument("--tau", type=float, default=0.005)
    args = parser.parse_args()
    torch.manual_seed(0)
    n = args.size
    f_x, f_y = torch.randn(1, args.channels, n, n), torch.randn(1, args.channels, n, n)
    value = torch.randn(1, 3, n, n)

    def chunked(v, a, b, tau):
        return soft_warp(v, a, b, tau, chunk_size=args.chunk)

    print(
        f"latent {n}x{n} ({n * n} positions, correlation {n * n}x{n * n}), {args.channels} channels, "
        f"chunk {args.chunk} rows"
    )
    with torch.no_grad():
        difference = (chunked(value, f_x, f_y, args.tau) - naive_warp(value, f_x, f_y, args.tau)).abs().max()
        naive = peak_bytes(lambda: naive_warp(value, f_x, f_y, args.tau))
        ours = peak_bytes(lambda: chunked(value, f_x, f_y, args.tau))
    print(
        f"inference  naive {naive / 2**20:8.1f} MiB   chunked {ours / 2**20:8.1f} MiB   "
        f"ratio {naive / max(ours, 1):6.1f}x   max |difference| {float(difference):.2e}"
    )
    grads = [t.clone().requires_grad_() for t in (f_x, f_y)]
    naive = peak_bytes(training_step(naive_warp, value, *grads, args.tau))
    ours = peak_bytes(training_step(chunked, value, *grads, args.tau))
    print(
        f"train step naive {naive / 2**20:8.1f} MiB   chunked {ours / 2**20:8.1f} MiB   "
        f"ratio {naive / max(ours, 1):6.1f}x"
    )


if __name__ == "__main__":
    main()
