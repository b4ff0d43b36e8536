"""Regenerate examples/: condition/exemplar pairs from held-out synthfaces samples, their translations by
the bundled model, and overview.png (condition | exemplar | output | oracle, one row per pair).

The held-out samples are the val split of the bundle run (`midms demo --train --profile bundle --out
runs/bundle`, generated with seed 1; the model trained on seed 0): every exemplar is another face, with
colours of its own. Outputs go through the same code path as `midms translate COND REF` without other
arguments: the exemplar's canny condition is computed from the photo. The first PAIRS samples are kept,
unselected (the average over 200 pairs is in the README's quality table).

    python examples/make_examples.py [--data runs/bundle/data] [--pairs 6]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from midms_cli.conditions.io import save_condition
from midms_cli.data.shards import iterate_samples
from midms_cli.grids import condition_picture, save_labelled_grid
from midms_cli.images import load_image, save_png
from midms_cli.metrics.oracle import psnr
from midms_cli.pipelines.translate import BUNDLED_MODEL, Pair, TranslateOptions, load_midm, translate_pairs

HERE = Path(__file__).resolve().parent


def candidates(data: Path, count: int) -> list[dict]:
    samples = []
    for sample in iterate_samples(data, "val", strict=True):
        samples.append(sample)
        if len(samples) == count:
            break
    return samples


def translate_files(model, condition: Path, exemplar: Path, output: Path) -> torch.Tensor:
    """`midms translate CONDITION EXEMPLAR -o OUTPUT` with the defaults; returns the written image."""
    translate_pairs(model, [Pair(condition, exemplar, output)], TranslateOptions())
    return load_image(output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("runs/bundle/data"))
    parser.add_argument("--pairs", type=int, default=6)
    args = parser.parse_args()

    model = load_midm(BUNDLED_MODEL)
    for old in HERE.glob("[0-9][0-9]_*.png"):
        old.unlink()
    rows = []
    for number, sample in enumerate(candidates(args.data, args.pairs), start=1):
        stem = HERE / f"{number:02d}"
        condition, exemplar, output = (
            Path(f"{stem}_cond.png"),
            Path(f"{stem}_ref.png"),
            Path(f"{stem}_out.png"),
        )
        save_condition(sample["cond"], condition)
        save_png(sample["ref"], exemplar)
        image = translate_files(model, condition, exemplar, output)
        save_png(sample["oracle"], Path(f"{stem}_oracle.png"))
        rows.append([condition_picture(sample["cond"]), sample["ref"], image, sample["oracle"]])
        value = float(psnr(image[None], sample["oracle"][None])[0])
        pairing = sample["meta"].get("pairing")
        print(f"{stem.name}: {sample['meta']['key']} ({pairing}) oracle PSNR {value:.2f} dB")
    save_labelled_grid(HERE / "overview.png", rows, ("condition", "exemplar", "output", "oracle"))


if __name__ == "__main__":
    main()
