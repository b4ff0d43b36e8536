"""Throughput of `midms prepare` (samples/s) for synthfaces and the CelebA-HQ recipe, on CPU.

Run: python benchmarks/bench_prepare.py [--count 32] [--size 64] [--workers 1]
Each line prints samples per second and the ratio to a baseline measured in the same run on the
same data, so the ratio survives noisy machines:
  synthfaces: baseline = generating the same samples without writing shards (plugin.samples),
              so the ratio is the share of time left after encoding and writing;
  celebahq:   baseline = reading and resizing the same photos and encoding them as PNG (the least
              any preparation has to do), so the ratio is the cost of the masks + 15-channel recipe
              + pairing + shard writing relative to plain image conversion.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from midms_cli.data.plugin import default_options
from midms_cli.pipelines.prepare import PrepareConfig, prepare


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def report(name: str, rate: float, baseline_name: str, baseline_rate: float) -> None:
    print(f"{name:<11} prepare {rate:8.2f} samples/s   {baseline_name:<13} {baseline_rate:8.2f} samples/s"
          f"   ratio {rate / baseline_rate:.3f}")  # fmt: skip


def write_celebamask(root: Path, count: int, size: int) -> None:
    """A generated folder in the CelebAMask-HQ layout: photos + three part masks per id."""
    rng = np.random.default_rng(0)
    (root / "CelebA-HQ-img").mkdir(parents=True)
    yy, xx = np.mgrid[:size, :size] / size
    for image_id in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "CelebA-HQ-img" / f"{image_id}.jpg", quality=90)
        folder = root / "CelebAMask-HQ-mask-anno" / str(image_id // 2000)
        folder.mkdir(parents=True, exist_ok=True)
        for k, part in enumerate(("skin", "nose", "hair")):
            inside = (yy - 0.4 - 0.05 * k) ** 2 + (xx - 0.5) ** 2 < (0.35 - 0.1 * k) ** 2
            Image.fromarray((inside * 255).astype(np.uint8)).save(folder / f"{image_id:05d}_{part}.png")


def png_baseline(paths: list[Path], size: int) -> None:
    for path in paths:
        with Image.open(path) as handle:
            small = handle.convert("RGB").resize((size, size), Image.BILINEAR)
        small.save(io.BytesIO(), format="PNG")


def bench_synthfaces(args, work: Path) -> None:
    from midms_plugins.synthfaces import PLUGIN

    options = default_options(PLUGIN)
    baseline = timed(lambda: list(PLUGIN.samples(None, "train", options, 0, args.size, 0, args.count)))
    config = PrepareConfig(dataset="synthfaces", out=work / "synth", size=args.size, splits=("train",),
                           limit=args.count, workers=args.workers, options=options)  # fmt: skip
    elapsed = timed(lambda: prepare(config, PLUGIN))
    report("synthfaces", args.count / elapsed, "generate only", args.count / baseline)


def bench_celebahq(args, work: Path) -> None:
    from midms_plugins.celebahq import PLUGIN

    source = work / "celebamask"
    write_celebamask(source, args.count, 2 * args.size)
    photos = sorted((source / "CelebA-HQ-img").glob("*.jpg"))
    baseline = timed(lambda: png_baseline(photos, args.size))
    options = {**default_options(PLUGIN), "val_fraction": 0.0}
    config = PrepareConfig(dataset="celebahq", out=work / "celeba", source=source, size=args.size,
                           splits=("train",), workers=args.workers, options=options)  # fmt: skip
    elapsed = timed(lambda: prepare(config, PLUGIN))
    report("celebahq", args.count / elapsed, "png encode", args.count / baseline)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.count} samples at {args.size} px, {args.workers} worker(s), {args.threads} torch thread(s)")
    with tempfile.TemporaryDirectory() as tmp:
        bench_synthfaces(args, Path(tmp))
        bench_celebahq(args, Path(tmp))


if __name__ == "__main__":
    main()
