"""`evaluate`: translate a fixed pair list, compute the metrics, record the protocol (architecture 7).

Two entry points, both usable without the CLI:
* `evaluate_model` translates every pair of a split with a MIDMs model, writes the outputs as PNG,
  and compares them with the sources (ground truth), the exemplars and, on synthfaces, the oracle;
  optionally the same metrics for two baselines (the exemplar copied unchanged, and the initial
  warp decoded without diffusion).
* `evaluate_folders` compares a folder of generated images with a folder of real ones.
Each writes `protocol.json`, `results.json` and, for models, `report.html` into the output folder.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from midms_cli.atomic import write_text
from midms_cli.errors import MidmsError
from midms_cli.images import load_image, save_png, to_uint8
from midms_cli.metrics import METRICS, NETWORK_WEIGHTS, select_metrics
from midms_cli.metrics.fid import image_set_hash
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
from midms_cli.metrics.suite import CachedSet, MetricSuite
from midms_cli.paths import midms_home
from midms_cli.report import write_report
from midms_cli.weights import sha256_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
REPORT_ROWS = 64  # pairs shown in report.html (every output is still written and scored)
Report = Callable[[str], None]


def _stderr(message: str) -> None:
    sys.stderr.write(message + "\n")


def _provided_weights(networks: dict[str, torch.nn.Module] | None) -> set[str]:
    """Registry weights made unnecessary by networks the caller passes in (tests, notebooks)."""
    return {weight for name in (networks or {}) for weight in NETWORK_WEIGHTS.get(name, ())}


def _metric_weights(metrics: Sequence[str], networks: dict[str, torch.nn.Module] | None) -> list[str]:
    """The registry weights the chosen metrics will load (their hashes go into protocol.json)."""
    provided = _provided_weights(networks)
    return sorted({w for name in metrics for w in METRICS[name].weights if w not in provided})


def _stats_cache(name: str) -> Path:
    return midms_home() / "fid-stats" / f"{name}.safetensors"


# --------------------------------------------------------------------------------------------
# Folder vs folder


def list_images(directory: str | Path) -> list[Path]:
    """The image files directly inside `directory`, sorted by name; a user error when none."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MidmsError(f"no such folder: {directory}")
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise MidmsError(
            f"{directory} holds {len(files)} image(s); metrics need at least 2 ({', '.join(IMAGE_SUFFIXES)})"
        )
    return files


def _image_batches(files: Sequence[Path], size: int, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(files), batch_size):
        yield torch.stack([load_image(path, size) for path in files[start : start + batch_size]])


def evaluate_folders(
    real_dir: str | Path,
    fake_dir: str | Path,
    *,
    metrics: Sequence[str] | None = None,
    out_dir: str | Path | None = None,
    seed: int = 0,
    size: int | None = None,
    device: torch.device | None = None,
    batch_size: int = 16,
    networks: dict[str, torch.nn.Module] | None = None,
    report: Report = _stderr,
) -> dict[str, Any]:
    """FID / KID / SWD of the images in `fake_dir` against those in `real_dir` ("fid" is w/ real).

    Images are resized (bicubic) to `size`, by default the size of the first generated image.
    The real set's Inception features are cached by a hash of its file names and contents.
    """
    # Check the inputs and the metrics before any work.
    real_files, fake_files = list_images(real_dir), list_images(fake_dir)
    chosen = select_metrics(metrics, folders=True, provided=_provided_weights(networks), report=report)
    if not chosen:
        raise MidmsError("no metric can run: add the weights named above, or ask for --metrics swd")
    if size is None:
        size = load_image(fake_files[0]).shape[-1]
    device = device or torch.device("cpu")
    hashes = weights_hashes(_metric_weights(chosen, networks))

    # Accumulate both sets.
    cache = {}
    if "inception" not in (networks or {}) and {"fid", "kid"} & set(chosen):
        key = image_set_hash(real_files, extra=f"{hashes.get('inception-fid')}:{size}")
        cache["source"] = CachedSet(_stats_cache(key), key)
    suite = MetricSuite(chosen, size, device, seed, networks=dict(networks or {}), cache=cache)
    for batch in _image_batches(fake_files, size, batch_size):
        suite.add({"output": batch})
    for batch in _image_batches(real_files, size, batch_size):
        suite.add({"source": batch})
    results = suite.result()

    # Record.
    protocol = protocol_record(
        mode="folders",
        real=str(real_dir),
        fake=str(fake_dir),
        real_count=len(real_files),
        fake_count=len(fake_files),
        real_hash=image_set_hash(real_files),
        fake_hash=image_set_hash(fake_files),
        size=size,
        metrics=chosen,
        seeds={"metrics": seed},
        weights=hashes,
    )
    if out_dir is not None:
        write_json(Path(out_dir) / "protocol.json", protocol)
        write_json(Path(out_dir) / "results.json", results)
    return {"results": results, "protocol": protocol}


# --------------------------------------------------------------------------------------------
# Model evaluation


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


def _condition_preview(condition: torch.Tensor, kind: str) -> torch.Tensor:
    """A (3, H, W) picture in [-1, 1] of a condition (C, H, W) in [0, 1] for the report."""
    if kind == "celebahq-edges" or condition.shape[0] == 1:
        picture = condition[:1].expand(3, -1, -1)  # channel 0: the edge map
    elif condition.shape[0] == 3:
        picture = condition
    else:  # label-like maps: a fixed pseudo-colour per channel of the argmax
        labels = condition.argmax(dim=0)
        palette = torch.rand(condition.shape[0], 3, generator=torch.Generator().manual_seed(0))
        picture = palette[labels].permute(2, 0, 1)
    return picture * 2 - 1


def _synthfaces_masks(meta: dict[str, Any], which: str, size: int) -> torch.Tensor | None:
    """Part masks (13, H, W) of a synthfaces sample's condition ("geometry") or exemplar ("ref_geometry")."""
    geometry = meta.get(which)
    if geometry is None:
        return None
    from midms_plugins.synthfaces.generator import part_masks_of, render_labels

    return part_masks_of(render_labels(geometry, size))


@dataclass
class _Job:
    pair: Pair
    condition: dict[str, Any]  # the sample whose condition (and source, oracle) is used
    exemplar: dict[str, Any]  # the sample whose stored exemplar is used


def _quantise(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images rounded to the 8-bit grid as `save_png` stores them."""
    return to_uint8(images).float() / 127.5 - 1


def _file_stem(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in key)


class ModelEvaluation:
    """One `evaluate_model` run: pairs in, PNGs and metric suites out (phases in `run`)."""

    def __init__(
        self,
        model: torch.nn.Module,
        index: dict[str, Any],
        options: EvalOptions,
        chosen: list[str],
        networks: dict[str, torch.nn.Module] | None,
        cache: dict[str, CachedSet],
    ) -> None:
        from midms_cli.conditions.celebahq import CELEBAHQ_PARTS

        self.model, self.index, self.options = model, index, options
        self.size = int(index["image_size"])
        self.kind = index["condition"]["kind"]
        self.synthfaces = index.get("plugin") == "synthfaces"
        parts = tuple(CELEBAHQ_PARTS) if self.synthfaces else ()
        shared = dict(networks or {})

        def suite(**extra: Any) -> MetricSuite:
            return MetricSuite(
                chosen, self.size, options.device, options.seed, parts, networks=shared, **extra
            )

        self.suites = {"model": suite(cache=cache)}
        if options.baselines:  # the baselines share the model's source and exemplar features
            self.suites["exemplar_copy"] = suite(references_from=self.suites["model"])
            self.suites["initial_warp"] = suite(references_from=self.suites["model"])
        self.rows: list[dict[str, str | None]] = []
        self.written: set[str] = set()
        self.out = Path(options.out_dir)

    # Translation of one batch.

    def _translate(self, jobs: list[_Job], batch_number: int) -> tuple[torch.Tensor, torch.Tensor]:
        from midms_cli.sampler import translate

        device = self.options.device
        condition = torch.stack([job.condition["cond"] for job in jobs]).to(device)
        exemplar = torch.stack([job.exemplar["ref"] for job in jobs]).to(device)
        exemplar_condition = torch.stack([job.exemplar["ref_cond"] for job in jobs]).to(device)
        # One generator per batch, seeded by (seed, batch number): the same pair list, batch size and
        # seed give the same images.
        generator = torch.Generator(device=device).manual_seed(self.options.seed * 1_000_003 + batch_number)
        result = translate(self.model, condition, exemplar, exemplar_condition, generator=generator)
        with torch.no_grad():
            warp = self.model.decode(result.initial_warp)
        # Score exactly what the PNGs hold: the 8-bit grid.
        return _quantise(result.image.cpu()), _quantise(warp.cpu())

    def _write(self, folder: str, name: str, image: torch.Tensor) -> str:
        """Save a PNG once under images/FOLDER/NAME.png; returns its path relative to the report."""
        relative = f"images/{folder}/{name}.png"
        if relative not in self.written:
            save_png(image, self.out / relative)
            self.written.add(relative)
        return relative

    def _report_row(self, job: _Job, name: str, output: torch.Tensor, warp: torch.Tensor) -> dict[str, Any]:
        condition, exemplar = _file_stem(job.pair.condition), _file_stem(job.pair.exemplar)
        row = {
            "label": f"{job.pair.condition} / {job.pair.exemplar}",
            "output": f"images/output/{name}.png",
            "initial warp": self._write("warp", name, warp),
            "condition": self._write(
                "condition", condition, _condition_preview(job.condition["cond"], self.kind)
            ),
            "exemplar": self._write("exemplar", exemplar, job.exemplar["ref"]),
            "source": self._write("source", condition, job.condition["image"]),
        }
        if job.pair.primary and "oracle" in job.condition:
            row["oracle"] = self._write("oracle", condition, job.condition["oracle"])
        return row

    def _batch(self, jobs: list[_Job], number: int) -> None:
        outputs, warps = self._translate(jobs, number)
        primary = [i for i, job in enumerate(jobs) if job.pair.primary]
        for i, job in enumerate(jobs):
            name = f"{_file_stem(job.pair.condition)}__{_file_stem(job.pair.exemplar)}"
            self._write("output", name, outputs[i])
            if len(self.rows) < REPORT_ROWS:
                self.rows.append(self._report_row(job, name, outputs[i], warps[i]))

        # Diversity: every output, grouped by condition.
        keys = [job.pair.condition for job in jobs]
        candidates = {"model": outputs}
        if self.options.baselines:
            candidates["exemplar_copy"] = torch.stack([job.exemplar["ref"] for job in jobs])
            candidates["initial_warp"] = warps
        for name, images in candidates.items():
            self.suites[name].add_diversity(keys, images)
        if not primary:
            return

        # Set metrics on the dataset's own pairs: sources, exemplars, oracle, part masks.
        pick = [jobs[i] for i in primary]
        batch: dict[str, Any] = {
            "source": torch.stack([job.condition["image"] for job in pick]),
            "exemplar": torch.stack([job.exemplar["ref"] for job in pick]),
            "warp": warps[primary],
        }
        if all("oracle" in job.condition for job in pick):
            batch["oracle"] = torch.stack([job.condition["oracle"] for job in pick])
        if self.synthfaces:
            output_masks = [_synthfaces_masks(job.condition["meta"], "geometry", self.size) for job in pick]
            exemplar_masks = [
                _synthfaces_masks(job.exemplar["meta"], "ref_geometry", self.size) for job in pick
            ]
            if all(m is not None for m in output_masks + exemplar_masks):
                batch["output_masks"] = torch.stack(output_masks)
                batch["exemplar_masks"] = torch.stack(exemplar_masks)
        self.suites["model"].add({**batch, "output": outputs[primary]})
        if self.options.baselines:
            self.suites["exemplar_copy"].add({**batch, "output": batch["exemplar"]})
            self.suites["initial_warp"].add({**batch, "output": warps[primary]})

    def run(self, jobs: Iterator[_Job], progress: Callable[[int], None] | None) -> None:
        pending: list[_Job] = []
        number = 0
        for job in jobs:
            pending.append(job)
            if len(pending) == self.options.batch_size:
                self._batch(pending, number)
                number += 1
                if progress:
                    progress(len(pending))
                pending = []
        if pending:
            self._batch(pending, number)
            if progress:
                progress(len(pending))


def _jobs(root: Path, split: str, pairs: list[Pair]) -> Iterator[_Job]:
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
        yield _Job(pair, kept[pair.condition], kept[pair.exemplar])
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
        cache[name] = CachedSet(_stats_cache(key), key)
    return cache


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
    pairs_path: str | Path | None = None,
    diversity: int = 2,
    batch_size: int = 8,
    device: torch.device | None = None,
    networks: dict[str, torch.nn.Module] | None = None,
    report: Report = _stderr,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Evaluate a MIDMs model on a prepared split (see the module docstring); returns
    {"results", "protocol", "out_dir"}. `networks` overrides the metric networks (tests)."""
    from midms_cli.data.shards import read_index
    from midms_cli.pipelines.translate import load_midm, resolve_model_file

    options = EvalOptions(
        split,
        Path(out_dir),
        metrics,
        limit,
        seed,
        baselines,
        Path(pairs_path) if pairs_path else None,
        diversity,
        batch_size,
        device or torch.device("cpu"),
    )
    if limit is not None and limit < 1:
        raise MidmsError(f"--limit must be at least 1, got {limit}")
    if batch_size < 1:
        raise MidmsError(f"--batch-size must be at least 1, got {batch_size}")

    # Check everything before any work: data, pair list, metrics and their weights, model.
    root = Path(data_root)
    index = read_index(root, split)
    has_oracle = index.get("plugin") == "synthfaces"
    chosen = select_metrics(
        metrics, has_oracle=has_oracle, provided=_provided_weights(networks), report=report
    )
    pairs = plan_pairs(split_keys(root, split), options)
    if not chosen:
        raise MidmsError("no metric can run: add the weights named above, or ask for --metrics swd")
    hashes = weights_hashes(_metric_weights(chosen, networks))
    model_file = resolve_model_file(model_path)
    model = load_midm(model_file, device=options.device)

    # Translate every pair and accumulate the metrics.
    pair_text = format_pairs(pairs)
    evaluation = ModelEvaluation(
        model, index, options, chosen, networks, _reference_cache(index, pairs, hashes)
    )
    if on_start:
        on_start(len(pairs))
    evaluation.run(_jobs(root, split, pairs), progress)
    results = {name: suite.result() for name, suite in evaluation.suites.items()}
    results = (
        results["model"]
        if not baselines
        else {
            "model": results["model"],
            "baselines": {name: value for name, value in results.items() if name != "model"},
        }
    )

    # Record the protocol, the numbers and the report.
    out = Path(out_dir)
    write_text(out / "pairs.txt", pair_text)
    sampling = getattr(getattr(model, "config", None), "sampling", None)
    protocol = protocol_record(
        mode="model",
        split=split,
        size=evaluation.size,
        condition=index["condition"]["kind"],
        plugin=index.get("plugin"),
        data_hash=data_hash(index),
        pairs_file="pairs.txt",
        pairs_hash=text_sha256(pair_text),
        pairs=len(pairs),
        primary_pairs=sum(pair.primary for pair in pairs),
        model_hash=sha256_file(model_file),
        metrics=chosen,
        weights=hashes,
        sampler=_sampler_dict(sampling),
        seeds={"generation": seed, "metrics": seed},
        batch_size=batch_size,
        baselines=baselines,
        diversity_exemplars=diversity,
        # Regions of the style metric (spec 4.2 leaves them open for edge maps).
        style_regions="synthfaces part masks" if evaluation.synthfaces else "whole image",
    )
    write_json(out / "protocol.json", protocol)
    write_json(out / "results.json", results)
    columns = ["condition", "exemplar", "output", "initial warp", "source", "oracle"]
    flat = results if not baselines else _flatten(results)
    write_report(
        out / "report.html",
        title=f"midms evaluation: {model_file.name} on {split}",
        results=flat,
        protocol=protocol,
        columns=columns,
        rows=evaluation.rows,
    )
    return {"results": results, "protocol": protocol, "out_dir": str(out)}


def _sampler_dict(sampling: Any) -> dict[str, Any]:
    if sampling is None:
        return {}
    return {
        key: (list(value) if isinstance(value, tuple) else value)
        for key, value in dataclasses.asdict(sampling).items()
    }


def _flatten(results: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in results.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
