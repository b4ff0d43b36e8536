"""`evaluate`: translate a fixed pair list, score it, record the protocol.

`evaluate_model` translates every pair of a split with a MIDMs model, writes the outputs as PNG,
and compares them with the sources (ground truth), the exemplars and, on synthfaces, the oracle.
With baselines it scores, on the same pairs and with the same noise, the ablations and baselines of
`eval_methods.METHODS`; with several seeds it repeats everything per noise seed and reports the mean
and standard deviation. It writes `protocol.json`, `results.json`, `pairs.txt` and `report.html`.
`evaluate_folders` (in `eval_folders`) compares a folder of generated images with a folder of real ones.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from midms_cli import distributed
from midms_cli.atomic import write_text
from midms_cli.errors import MidmsError
from midms_cli.metrics import select_metrics
from midms_cli.metrics.protocol import (
    Pair,
    default_pairs,
    format_pairs,
    parse_pairs,
    protocol_record,
    text_sha256,
    weights_hashes,
    write_json,
)
from midms_cli.metrics.suite import CachedSet
from midms_cli.pipelines.eval_folders import (
    IMAGE_SUFFIXES,
    Report,
    _stderr,
    evaluate_folders,
    list_images,
    metric_weights,
    provided_weights,
    stats_cache,
)
from midms_cli.pipelines.eval_methods import METHODS, SAME_AS_MODEL, Job, ModelEvaluation, methods_for
from midms_cli.report import write_report
from midms_cli.weights import sha256_file

__all__ = [
    "IMAGE_SUFFIXES", "EvalOptions", "evaluate_folders", "evaluate_model", "list_images", "plan_pairs",
    "split_keys", "summarise_seeds",
]  # fmt: skip


@dataclass
class EvalOptions:
    """What `evaluate_model` needs besides the model and the data."""

    split: str = "val"
    out_dir: Path = Path("eval")
    metrics: Sequence[str] | None = None
    limit: int | None = None
    seed: int = 0
    baselines: bool = False
    pairs_path: Path | None = None
    diversity: int = 2  # extra exemplars per condition for LPIPS diversity (0: none)
    batch_size: int = 8
    seeds: int = 1  # noise seeds seed, seed + 1, ...: every number is their mean (and sd when > 1)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def data_hash(index: dict[str, Any]) -> str:
    """Hash of a prepared split's content (plugin, options, size, condition, shard sha256s), not of
    index.json itself, which carries a creation time."""
    content = {
        key: index.get(key)
        for key in ("plugin", "plugin_version", "options", "seed", "split", "image_size", "condition")
    }
    content["shards"] = [entry.get("sha256") for entry in index["shards"]]
    return text_sha256(json.dumps(content, sort_keys=True))


def split_keys(root: Path, split: str) -> list[str]:
    """Sample keys of a split in order, read from the tar headers (nothing is decoded)."""
    from midms_cli.data.shards import check_shards, read_shard

    keys = []
    for path in check_shards(root, split, strict=True):
        keys += [raw["__key__"] for raw in read_shard(path)]
    return keys


def plan_pairs(keys: Sequence[str], options: EvalOptions) -> list[Pair]:
    """The pair list: from --pairs, or each sample's own pair plus diversity pairs; --limit keeps the
    first N conditions. Unknown keys are a user error."""
    if options.pairs_path is not None:
        path = Path(options.pairs_path)
        if not path.is_file():
            raise MidmsError(f"no such pair list: {path}")
        pairs = parse_pairs(path.read_text(), str(path))
        known = set(keys)
        for pair in pairs:
            for key in (pair.condition, pair.exemplar):
                if key not in known:
                    raise MidmsError(
                        f"pair list {path} names sample {key!r}, which is not in the {options.split} split"
                    )
        if options.limit is not None:
            conditions = list(dict.fromkeys(pair.condition for pair in pairs))[: options.limit]
            pairs = [pair for pair in pairs if pair.condition in set(conditions)]
        return pairs
    return default_pairs(list(keys), options.diversity, options.limit)


def _jobs(root: Path, split: str, pairs: list[Pair]) -> Iterator[Job]:
    """The jobs in pair-list order, decoding each needed sample once. Samples that later pairs still
    need are kept (only those), so memory follows the pair list, not the split."""
    from midms_cli.data.shards import iterate_samples

    needed: dict[str, int] = {}
    for pair in pairs:
        for key in {pair.condition, pair.exemplar}:
            needed[key] = needed.get(key, 0) + 1
    kept: dict[str, dict[str, Any]] = {}
    stream = iterate_samples(root, split, strict=True)
    for pair in pairs:
        while pair.condition not in kept or pair.exemplar not in kept:
            try:
                sample = next(stream)
            except StopIteration:
                raise MidmsError(
                    f"the {split} split ended before sample {pair.condition!r} or {pair.exemplar!r} was found"
                ) from None
            if sample["meta"]["key"] in needed:
                kept[sample["meta"]["key"]] = sample
        yield Job(pair, kept[pair.condition], kept[pair.exemplar])
        for key in {pair.condition, pair.exemplar}:
            needed[key] -= 1
            if needed[key] == 0:
                kept.pop(key, None)


def _reference_cache(
    index: dict[str, Any], pairs: Sequence[Pair], hashes: dict[str, str]
) -> dict[str, CachedSet]:
    """Cache entries for the Inception features of the sources and exemplars of the dataset's own
    pairs: keyed by the data, those pairs and the network, so a re-evaluation skips them."""
    if "inception-fid" not in hashes:
        return {}
    primary = format_pairs(pair for pair in pairs if pair.primary)
    cache = {}
    for name in ("source", "exemplar"):
        key = text_sha256(f"{data_hash(index)}:{text_sha256(primary)}:{hashes['inception-fid']}:{name}")
        cache[name] = CachedSet(stats_cache(key), key)
    return cache


def summarise_seeds(per_seed: list[dict[str, dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Mean and sample standard deviation over seeds of every number of every method. The sd is
    given only with two seeds or more; a number missing from one seed is left out."""
    means: dict[str, dict[str, Any]] = {}
    spreads: dict[str, dict[str, Any]] = {}
    for method in per_seed[0]:
        means[method], spreads[method] = {}, {}
        for key, value in per_seed[0][method].items():
            values = [run[method].get(key) for run in per_seed]
            if not all(isinstance(v, int | float) for v in values):
                means[method][key] = value
                continue
            mean = sum(values) / len(values)
            means[method][key] = mean
            if len(values) > 1:
                spreads[method][key] = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return means, spreads


def evaluate_model(
    model_path: str | Path | None,
    data_root: str | Path,
    split: str = "val",
    out_dir: str | Path = "eval",
    metrics: Sequence[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
    baselines: bool = False,
    *,
    seeds: int = 1,
    pairs_path: str | Path | None = None,
    diversity: int = 2,
    batch_size: int = 8,
    device: torch.device | None = None,
    networks: dict[str, torch.nn.Module] | None = None,
    report: Report = _stderr,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    notes: Sequence[str] = (),
    model: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Evaluate a MIDMs model on a prepared split (see the module docstring); returns
    {"results", "protocol", "out_dir"}. `networks` overrides the metric networks (tests);
    `notes` are printed at the top of the report; `model`: the file's model, already loaded.

    results: {"seeds": [...], "methods": {method: {metric: mean}}, "sd": {method: {metric: sd}},
    "same_as_model": [ablations not rerun, since they leave the model's sampler as it is],
    "per_seed": [{"seed": s, "methods": {...}}, ...]}; without baselines the only method is "model".
    Under torchrun (a process group joined) the batches are shared among the processes and the main
    process writes and returns what one process would; the others return results None.
    """
    from midms_cli.data.shards import read_index
    from midms_cli.pipelines.translate import load_midm, resolve_model_file

    options = EvalOptions(
        split=split,
        out_dir=Path(out_dir),
        metrics=metrics,
        limit=limit,
        seed=seed,
        baselines=baselines,
        pairs_path=Path(pairs_path) if pairs_path else None,
        diversity=diversity,
        batch_size=batch_size,
        seeds=seeds,
        device=device or torch.device("cpu"),
    )
    if limit is not None and limit < 1:
        raise MidmsError(f"--limit must be at least 1, got {limit}")
    if batch_size < 1:
        raise MidmsError(f"--batch-size must be at least 1, got {batch_size}")
    if seeds < 1:
        raise MidmsError(f"--seeds must be at least 1, got {seeds}")

    # Check everything before any work: data, pair list, metrics and their weights, model.
    root = Path(data_root)
    index = read_index(root, split)
    has_oracle = index.get("plugin") == "synthfaces"
    chosen = select_metrics(
        metrics, has_oracle=has_oracle, provided=provided_weights(networks), report=report
    )
    pairs = plan_pairs(split_keys(root, split), options)
    if not chosen:
        raise MidmsError("no metric can run: add the weights named above, or ask for --metrics swd")
    hashes = weights_hashes(metric_weights(chosen, networks))
    model_file = resolve_model_file(model_path)
    model = model if model is not None else load_midm(model_file, device=options.device)
    methods = methods_for(baselines, has_oracle)

    # Translate every pair with every method, once per noise seed, and accumulate the metrics.
    out = Path(out_dir)
    seed_list = [seed + k for k in range(seeds)]
    if on_start:
        on_start(len(pairs) * seeds)
    per_seed, rows = [], []
    cache = _reference_cache(index, pairs, hashes)
    for number, noise_seed in enumerate(seed_list):
        evaluation = ModelEvaluation(
            model, index, methods=methods, metrics=chosen, seed=noise_seed, batch_size=batch_size,
            device=options.device, out=out, networks=networks, cache=cache, write_images=number == 0,
        )  # fmt: skip
        evaluation.run(_jobs(root, split, pairs), progress)
        if distributed.is_main():  # under torchrun the main process holds every metric statistic
            per_seed.append(evaluation.results())
            rows = rows or evaluation.rows
    if not distributed.is_main():
        return {"results": None, "protocol": None, "out_dir": str(out)}
    means, spreads = summarise_seeds(per_seed)
    results: dict[str, Any] = {
        "seeds": seed_list,
        "methods": means,
        "sd": spreads if seeds > 1 else {},
        # Ablations given the model's numbers: they take nothing out of its sampler.
        "same_as_model": sorted(evaluation.same_as_model),
        "per_seed": [{"seed": s, "methods": run} for s, run in zip(seed_list, per_seed, strict=True)],
    }

    # Record the protocol, the numbers and the report.
    pair_text = format_pairs(pairs)
    write_text(out / "pairs.txt", pair_text)
    sampling = getattr(getattr(model, "config", None), "sampling", None)
    protocol = protocol_record(
        mode="model",
        split=split,
        size=int(index["image_size"]),
        condition=index["condition"]["kind"],
        plugin=index.get("plugin"),
        data_hash=data_hash(index),
        pairs_file="pairs.txt",
        pairs_hash=text_sha256(pair_text),
        pairs=len(pairs),
        primary_pairs=sum(pair.primary for pair in pairs),
        model=model_file.name,
        model_hash=sha256_file(model_file),
        metrics=chosen,
        weights=hashes,
        sampler=_sampler_dict(sampling),
        methods={
            name: METHODS[name].label + (SAME_AS_MODEL if name in evaluation.same_as_model else "")
            for name in methods
        },
        ablations={name: METHODS[name].sampling for name in methods if METHODS[name].sampling is not None},
        seeds={"generation": seed_list, "metrics": seed_list},
        batch_size=batch_size,
        baselines=baselines,
        diversity_exemplars=diversity,
        # Regions of the style metric: the synthetic data knows its part masks, other data does not.
        style_regions="synthfaces part masks" if has_oracle else "whole image",
    )
    write_json(out / "protocol.json", protocol)
    write_json(out / "results.json", results)
    write_report(
        out / "report.html",
        title=f"midms evaluation: {model_file.name} on {split}",
        results=results,
        protocol=protocol,
        rows=rows,
        notes=notes,
    )
    return {"results": results, "protocol": protocol, "out_dir": str(out)}


def _sampler_dict(sampling: Any) -> dict[str, Any]:
    if sampling is None:
        return {}
    return {
        key: (list(value) if isinstance(value, tuple) else value)
        for key, value in dataclasses.asdict(sampling).items()
    }
