"""Where a model's initial warp loses against the oracle, on the first N pairs of a synthfaces split.

For each pair (condition, its own exemplar, oracle) it decodes: the learned soft warp R0 at the model's
τ and at --tau; the same matches taken hard (argmax, no softmax); and a bound that no model reaches
because it looks at the answer: every latent position takes the exemplar latent nearest (L2) to the
oracle's latent there, the best any hard warp on the latent grid can do. It reports oracle PSNR
(per image, averaged, on 8-bit images as `midms eval` scores them) for each, the ceiling (the oracle
through the first stage) and the exemplar copied; the PSNR of the warp and the copy over background
and face pixels (synthfaces labels); and the share of best matches that are the identity (the same
latent position in the exemplar), which a model that matches by position rather than content drives
towards 1.

    python examples/diagnose_matching.py --data runs/bundle/data [--model FILE] [--pairs 200]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from midms_cli.data.shards import iterate_samples
from midms_cli.images import to_uint8
from midms_cli.matching import soft_warp
from midms_cli.metrics.oracle import psnr_from_mse
from midms_cli.pipelines.eval_methods import synthfaces_labels
from midms_cli.pipelines.translate import load_midm, resolve_model_file


def squared_errors(image: torch.Tensor, oracle: torch.Tensor) -> torch.Tensor:
    """Per-pixel squared error (B, H, W) of the 8-bit images, in [0, 1] units."""
    a, b = to_uint8(image.clamp(-1, 1)).double() / 255, to_uint8(oracle).double() / 255
    return ((a - b) ** 2).mean(1)


def gather_positions(latent: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The latent (B, C, H, W) read at flat positions index (B, H*W): a hard warp."""
    b, c, h, w = latent.shape
    flat = latent.flatten(2)
    return torch.gather(flat, 2, index[:, None, :].expand(b, c, -1)).view(b, c, h, w)


@torch.no_grad()
def diagnose(model, samples: list[dict], tau: float, batch_size: int = 50) -> dict[str, float]:
    psnr_sums: dict[str, float] = {}
    region_errors: dict[str, list[float]] = {}
    identity, positions = 0, 0
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        cond, ref, ref_cond, oracle = (
            torch.stack([s[k] for s in batch]) for k in ("cond", "ref", "ref_cond", "oracle")
        )
        labels = torch.stack([synthfaces_labels(s["meta"], oracle.shape[-1]) for s in batch])
        exemplar, condition = model.encode_exemplar(ref, ref_cond), model.condition_features(cond)
        z_y, z_oracle = exemplar.latent, model.encode(oracle)
        query = F.normalize(condition.matching.flatten(2).mT, dim=-1)
        key = F.normalize(exemplar.matching.flatten(2).mT, dim=-1)
        best = (query @ key.mT).argmax(-1)
        identity += int((best == torch.arange(best.shape[1])).sum())
        positions += best.numel()
        nearest = torch.cdist(z_oracle.flatten(2).mT, z_y.flatten(2).mT).argmin(-1)
        outputs = {
            "ceiling (oracle through the first stage)": model.decode(z_oracle),
            "exemplar copied": ref,
            f"learned warp, model tau {model.config.sampling.tau:g}": model.decode(
                model.initial_match(condition, exemplar)
            ),
            f"learned warp, tau {tau:g}": model.decode(
                soft_warp(z_y, condition.matching, exemplar.matching, tau)
            ),
            "learned matches taken hard (argmax)": model.decode(gather_positions(z_y, best)),
            "bound: nearest exemplar latent to the oracle's": model.decode(gather_positions(z_y, nearest)),
        }
        for name, image in outputs.items():
            errors = squared_errors(image, oracle)
            psnr_sums[name] = psnr_sums.get(name, 0.0) + sum(
                psnr_from_mse(float(mse)) for mse in errors.flatten(1).mean(1)
            )
            if name.startswith(("exemplar", "learned warp, model")):
                for region, mask in (("background", labels == 0), ("face and hair", labels != 0)):
                    total = region_errors.setdefault(f"{name}: {region}", [0.0, 0.0])
                    total[0] += float((errors * mask).sum())
                    total[1] += float(mask.sum())
    report = {f"PSNR {name}": value / len(samples) for name, value in psnr_sums.items()}
    for name, (error, count) in region_errors.items():
        report[f"pooled PSNR {name} ({count / (len(samples) * labels[0].numel()):.0%} of pixels)"] = (
            psnr_from_mse(error / count)
        )
    report["share of best matches that are the identity"] = identity / positions
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="prepared synthfaces shards")
    parser.add_argument("--model", type=Path, help="model file or run (default: the bundled one)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--tau", type=float, default=0.02, help="a second warp temperature to compare")
    args = parser.parse_args()
    model = load_midm(resolve_model_file(args.model))
    samples = []
    for sample in iterate_samples(args.data, args.split, strict=True):
        if "oracle" not in sample:
            parser.error(f"{args.data} has no oracles: diagnose a synthfaces split")
        samples.append(sample)
        if len(samples) == args.pairs:
            break
    for name, value in diagnose(model, samples, args.tau).items():
        print(f"{name:78s} {value:8.3f}")


if __name__ == "__main__":
    main()
