"""`midms demo` without --train: the bundled model on freshly generated pairs that need translation.

Generates held-out synthfaces pairs whose exemplar is another face (its own pose and colours), so the
right answer (the oracle: the condition's geometry in the exemplar's colours) is neither the exemplar
nor the condition's own photo. Translates them, draws a captioned grid (condition | exemplar | output |
oracle) and evaluates the model against its ablations and the copy / source / ceiling baselines.
Seconds on a CPU; nothing is trained.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from midms_cli.atomic import write_text
from midms_cli.errors import MidmsError

DATASET = "synthfaces"
SHOWCASE_FILE = "showcase.json"
GRID_CAPTIONS = ("condition", "exemplar", "output", "oracle")


@dataclass
class ShowcaseOptions:
    out: Path
    model: Path | None = None  # None: the bundled model
    pairs: int = 48  # evaluated pairs
    grid: int = 6  # pairs drawn in the grid
    seed: int = 0  # data generation (the val split of this seed) and noise
    seeds: int = 1  # noise seeds of the evaluation
    device: str = "auto"
    log: Callable[[str], None] = lambda message: None
    progress: Callable[[int], None] | None = None


def variant_for(model: Any) -> str:
    """The synthfaces condition variant that a model takes, from its condition channels."""
    channels = model.config.correspondence.cond_channels
    if channels == 1:
        return "canny"
    if channels == 15:
        return "official"
    raise MidmsError(f"the model takes {channels}-channel conditions; the demo's synthetic faces come with "
                     "1-channel (Canny) or 15-channel (CelebA-HQ edge recipe) conditions")  # fmt: skip


def prepare_pairs(out: Path, model: Any, options: ShowcaseOptions) -> Path:
    """The held-out pairs as shards (the val split: exemplars of independent appearance); kept on rerun."""
    from midms_cli.data.registry import get_plugin
    from midms_cli.pipelines.prepare import PrepareConfig, prepare

    data, variant, size = out / "data", variant_for(model), int(model.config.image_size)
    config = PrepareConfig(
        dataset=DATASET, out=data, size=size, splits=("val",), limit=options.pairs, shard_size=256,
        seed=options.seed, options={"variant": variant, "val_count": options.pairs},
        command=f"midms prepare synthfaces --out {data} --size {size} --split val --limit {options.pairs} "
                f"--seed {options.seed} --variant {variant} --val-count {options.pairs}",
    )  # fmt: skip
    prepare(config, get_plugin(DATASET), report=options.log)
    return data


@torch.no_grad()
def translation_grid(
    model: Any, samples: list[dict[str, Any]], path: Path, seed: int, title: str = ""
) -> None:
    """Translate each sample's own pair; write the captioned grid (condition | exemplar | output | oracle)."""
    from midms_cli.grids import condition_picture, save_labelled_grid
    from midms_cli.sampler import translate

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)

    def stack(name: str) -> torch.Tensor:
        return torch.stack([s[name] for s in samples]).to(device)

    result = translate(model, stack("cond"), stack("ref"), stack("ref_cond"), generator=generator)
    rows = [[condition_picture(s["cond"]), s["ref"], output.cpu(), s["oracle"]]
            for s, output in zip(samples, result.image, strict=True)]  # fmt: skip
    save_labelled_grid(path, rows, GRID_CAPTIONS, title=title)


def draw_grid(model: Any, data: Path, path: Path, options: ShowcaseOptions) -> None:
    from midms_cli.data.shards import iterate_samples

    samples = []
    for sample in iterate_samples(data, "val", strict=True):
        samples.append(sample)
        if len(samples) == options.grid:
            break
    translation_grid(model, samples, path, options.seed)


def run_showcase(options: ShowcaseOptions) -> dict[str, Any]:
    """Prepare pairs, draw the grid, evaluate; returns the summary also written to OUT/showcase.json."""
    from midms_cli.devices import resolve_device
    from midms_cli.metrics import select_metrics
    from midms_cli.pipelines.demo_stages import headline_numbers
    from midms_cli.pipelines.evaluate import evaluate_model
    from midms_cli.pipelines.translate import load_midm, resolve_model_file

    if options.pairs < 2 or options.grid < 1:
        raise MidmsError("the demo needs at least 2 pairs and 1 grid row")
    start = time.perf_counter()
    device = resolve_device(options.device)
    model_file = resolve_model_file(options.model)
    model = load_midm(model_file, device)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_pairs(out, model, options)
    draw_grid(model, data, out / "grid.png", options)
    chosen = select_metrics(None, has_oracle=True, report=options.log)
    evaluation = evaluate_model(
        model_file, data, "val", out / "eval", chosen, options.pairs, options.seed, True,
        seeds=options.seeds, diversity=0, batch_size=16, device=device, report=options.log,
        progress=options.progress, model=model,
    )  # fmt: skip
    summary = {
        "out": str(out),
        "model": str(model_file),
        "pairs": options.pairs,
        "seconds": round(time.perf_counter() - start, 2),
        "grid": str(out / "grid.png"),
        "report": str(out / "eval" / "report.html"),
        "methods": evaluation["results"]["methods"],
        "sd": evaluation["results"]["sd"],
        "same_as_model": evaluation["results"].get("same_as_model", []),
        "numbers": headline_numbers(evaluation["results"]),
    }
    write_text(out / SHOWCASE_FILE, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary
