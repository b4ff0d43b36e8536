"""The methods one model evaluation scores side by side, and the pass that translates and scores them.

Every method answers the same pairs: the model with its own sampler; the ablations of the paper's
network study (Seo et al. 2023, Table 3: components taken out one after another), run through the
same sampler with the same noise; and the baselines that tell translation from copying: the exemplar
copied, the condition's own photo (right geometry, wrong appearance: the best a condition-only model
could do), and, when the dataset knows the oracle, the oracle through the model's first stage (the
ceiling: no output of the model can be closer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from midms_cli import distributed
from midms_cli.config import SamplingConfig, rewarp_positions_within
from midms_cli.images import save_png, to_uint8
from midms_cli.metrics.protocol import Pair
from midms_cli.metrics.suite import CachedSet, MetricSuite

REPORT_ROWS = 64  # pairs shown in report.html (every output is still written and scored)


@dataclass(frozen=True)
class Method:
    """One row of the evaluation: its name in results.json, its label, and what it is."""

    name: str
    label: str
    kind: str  # "model", "ablation" or "baseline"
    sampling: dict[str, Any] | None = None  # SamplingConfig fields over the model's (ablations)


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("model", "MIDMs (the model's sampler)", "model"),
        Method("no_mask", "- confidence mask", "ablation", {"confidence_masking": False}),
        Method("no_rewarp", "- confidence mask - recurrent matching", "ablation",
               {"confidence_masking": False, "rewarp_positions": ()}),
        Method("initial_warp", "- diffusion (initial warp decoded)", "ablation"),
        Method("exemplar_copy", "exemplar copied", "baseline"),
        Method("source_photo", "source photo (condition's own photo)", "baseline"),
        Method("ceiling", "oracle through the first stage (ceiling)", "baseline"),
    )
}  # fmt: skip


def as_run(sampling: SamplingConfig) -> SamplingConfig:
    """The sampler as its loop runs it: without a re-warp inside the loop the confidence-mask
    settings change nothing, so they are set to the defaults (two samplers that run the same loop
    compare equal)."""
    if rewarp_positions_within(sampling.rewarp_positions, sampling.interleaved_steps):
        return sampling
    default = SamplingConfig()
    return dataclasses.replace(
        sampling,
        rewarp_positions=(),
        confidence_masking=default.confidence_masking,
        mask_variant=default.mask_variant,
        mask_threshold=default.mask_threshold,
        flow_tau=default.flow_tau,
    )


# Said after the label of an ablation that takes nothing out of the model's sampler.
SAME_AS_MODEL = " (= the model's sampler: it has no re-warp to take out)"


@dataclass
class Job:
    pair: Pair
    condition: dict[str, Any]  # the sample whose condition (and source, oracle) is used
    exemplar: dict[str, Any]  # the sample whose stored exemplar is used


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 images back to [-1, 1] floats on the 8-bit grid (the inverse of `to_uint8` there)."""
    return images.float() / 127.5 - 1


def file_stem(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in key)


def condition_preview(condition: torch.Tensor, kind: str) -> torch.Tensor:
    """A (3, H, W) picture in [-1, 1] of a condition (C, H, W) in [0, 1]: edges black on white,
    label-like maps in a fixed pseudo-colour per channel."""
    if kind == "celebahq-edges" or condition.shape[0] == 1:
        picture = 1 - condition[:1].expand(3, -1, -1)  # channel 0: the edge map
    elif condition.shape[0] == 3:
        picture = condition
    else:
        labels = condition.argmax(dim=0)
        palette = torch.rand(condition.shape[0], 3, generator=torch.Generator().manual_seed(0))
        picture = palette[labels].permute(2, 0, 1)
    return picture * 2 - 1


def synthfaces_labels(meta: dict[str, Any], size: int) -> torch.Tensor | None:
    """The full label map (H, W) of a synthfaces sample's own geometry (None for other data)."""
    geometry = meta.get("geometry")
    if geometry is None:
        return None
    from midms_plugins.synthfaces.generator import render_labels

    return render_labels(geometry, size)


def methods_for(baselines: bool, has_oracle: bool) -> list[str]:
    """The rows of an evaluation: the model alone, or every method the data allows."""
    if not baselines:
        return ["model"]
    return [name for name in METHODS if has_oracle or name != "ceiling"]


def _batches(jobs: Iterator[Job], size: int) -> Iterator[list[Job]]:
    batch: list[Job] = []
    for job in jobs:
        batch.append(job)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class ModelEvaluation:
    """One pass over the pairs with one noise seed: every method's outputs in, metric suites out."""

    def __init__(
        self,
        model: torch.nn.Module,
        index: dict[str, Any],
        *,
        methods: list[str],
        metrics: list[str],
        seed: int,
        batch_size: int,
        device: torch.device,
        out: Path,
        networks: dict[str, torch.nn.Module] | None,
        cache: dict[str, CachedSet],
        write_images: bool,
    ) -> None:
        from midms_cli.conditions.celebahq import CELEBAHQ_PARTS

        self.model, self.index = model, index
        self.methods, self.seed, self.batch_size, self.device = methods, seed, batch_size, device
        self.size = int(index["image_size"])
        self.kind = index["condition"]["kind"]
        self.synthfaces = index.get("plugin") == "synthfaces"
        parts: tuple[str, ...] = tuple(CELEBAHQ_PARTS) if self.synthfaces else ()
        labels: tuple[str, ...] = ()
        if self.synthfaces:
            from midms_plugins.synthfaces.generator import LABELS

            labels = tuple(LABELS)
        shared = dict(networks or {})
        first = MetricSuite(metrics, self.size, device, seed, parts, networks=shared, cache=cache,
                            label_names=labels)  # fmt: skip
        # The other rows share the first one's source and exemplar features.
        self.suites = {methods[0]: first}
        for name in methods[1:]:
            self.suites[name] = MetricSuite(metrics, self.size, device, seed, parts, networks=shared,
                                            references_from=first, label_names=labels)  # fmt: skip
        self.rows: list[dict[str, str | None]] = []
        # Ablations that take nothing out of this model's sampler (e.g. no re-warps from a loop without
        # any): the same loop from the same noise, so they are given the model's numbers, not rerun.
        own = as_run(model.config.sampling)
        self.same_as_model = {
            name for name in methods
            if METHODS[name].sampling is not None
            and as_run(dataclasses.replace(model.config.sampling, **METHODS[name].sampling)) == own
        }  # fmt: skip
        self.written: set[str] = set()
        self.out = out
        self.write_images = write_images
        self.batches_done = 0

    # Every method's images for one batch.

    @torch.no_grad()
    def _outputs(self, jobs: list[Job], batch_number: int) -> dict[str, torch.Tensor]:
        from midms_cli.sampler import translate

        device, model = self.device, self.model
        condition = torch.stack([job.condition["cond"] for job in jobs]).to(device)
        exemplar = model.encode_exemplar(
            torch.stack([job.exemplar["ref"] for job in jobs]).to(device),
            torch.stack([job.exemplar["ref_cond"] for job in jobs]).to(device),
        )

        def generator() -> torch.Generator:
            # Seeded by (seed, batch number): the same pair list, batch size and seed give the same
            # images, and every sampler variant of a batch starts from the same noise.
            return torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + batch_number)

        outputs: dict[str, torch.Tensor] = {}
        result = translate(model, condition, exemplar, generator=generator())
        outputs["model"] = result.image
        if "initial_warp" in self.methods:
            outputs["initial_warp"] = model.decode(result.initial_warp).clamp(-1, 1)
        for name in self.methods:
            method = METHODS[name]
            if method.sampling is not None and name not in self.same_as_model:
                sampling = dataclasses.replace(model.config.sampling, **method.sampling)
                outputs[name] = translate(model, condition, exemplar, sampling=sampling,
                                          generator=generator()).image  # fmt: skip
        if "exemplar_copy" in self.methods:
            outputs["exemplar_copy"] = torch.stack([job.exemplar["ref"] for job in jobs])
        if "source_photo" in self.methods:
            outputs["source_photo"] = torch.stack([job.condition["image"] for job in jobs])
        if "ceiling" in self.methods and all("oracle" in job.condition for job in jobs):
            oracle = torch.stack([job.condition["oracle"] for job in jobs]).to(device)
            outputs["ceiling"] = model.decode(model.encode(oracle)).clamp(-1, 1)
        # Score exactly what the PNGs hold: the 8-bit grid (uint8 here, which is also what travels
        # between the processes of a data-parallel evaluation).
        return {name: to_uint8(images.cpu()) for name, images in outputs.items()}

    # Images and report rows (first seed only).

    def _write(self, folder: str, name: str, image: torch.Tensor) -> str:
        """Save a PNG once under images/FOLDER/NAME.png; returns its path relative to the report."""
        relative = f"images/{folder}/{name}.png"
        if relative not in self.written:
            save_png(image, self.out / relative)
            self.written.add(relative)
        return relative

    def _report_row(self, job: Job, name: str, outputs: dict[str, torch.Tensor], i: int) -> dict[str, Any]:
        condition, exemplar = file_stem(job.pair.condition), file_stem(job.pair.exemplar)
        row: dict[str, Any] = {
            "label": f"{job.pair.condition} / {job.pair.exemplar}",
            "condition": self._write(
                "condition", condition, condition_preview(job.condition["cond"], self.kind)
            ),
            "exemplar": self._write("exemplar", exemplar, job.exemplar["ref"]),
            "output": f"images/output/{name}.png",
            "source": self._write("source", condition, job.condition["image"]),
        }
        if "initial_warp" in outputs:
            row["initial warp"] = self._write("warp", name, outputs["initial_warp"][i])
        if job.pair.primary and "oracle" in job.condition:
            row["oracle"] = self._write("oracle", condition, job.condition["oracle"])
        return row

    def _batch(self, jobs: list[Job], packed: dict[str, torch.Tensor]) -> None:
        """Write and score one batch's outputs (uint8, as `_outputs` gives them)."""
        outputs = {name: from_uint8(images) for name, images in packed.items()}
        if self.write_images:
            for i, job in enumerate(jobs):
                name = f"{file_stem(job.pair.condition)}__{file_stem(job.pair.exemplar)}"
                self._write("output", name, outputs["model"][i])
                if len(self.rows) < REPORT_ROWS:
                    self.rows.append(self._report_row(job, name, outputs, i))

        # Diversity: every output, grouped by condition.
        keys = [job.pair.condition for job in jobs]
        for name, images in outputs.items():
            self.suites[name].add_diversity(keys, images)
        primary = [i for i, job in enumerate(jobs) if job.pair.primary]
        if not primary:
            return

        # Set metrics on the dataset's own pairs: sources, exemplars, oracle, part masks and labels.
        pick = [jobs[i] for i in primary]
        batch: dict[str, Any] = {
            "source": torch.stack([job.condition["image"] for job in pick]),
            "exemplar": torch.stack([job.exemplar["ref"] for job in pick]),
        }
        if all("oracle" in job.condition for job in pick):
            batch["oracle"] = torch.stack([job.condition["oracle"] for job in pick])
        if self.synthfaces:
            self._add_synthfaces_regions(batch, pick)
        for name in self.methods:
            if name in outputs:
                self.suites[name].add({**batch, "output": outputs[name][primary]})

    def _add_synthfaces_regions(self, batch: dict[str, Any], pick: list[Job]) -> None:
        """Part masks of the condition's and the exemplar's geometry, and the condition's label map."""
        from midms_plugins.synthfaces.generator import part_masks_of, render_labels

        labels = [synthfaces_labels(job.condition["meta"], self.size) for job in pick]
        exemplar_geometry = [job.exemplar["meta"].get("ref_geometry") for job in pick]
        if any(label is None for label in labels) or any(g is None for g in exemplar_geometry):
            return
        batch["output_labels"] = torch.stack(labels)
        batch["output_masks"] = torch.stack([part_masks_of(label) for label in labels])
        batch["exemplar_masks"] = torch.stack(
            [part_masks_of(render_labels(geometry, self.size)) for geometry in exemplar_geometry]
        )

    def run(self, jobs: Iterator[Job], progress: Callable[[int], None] | None) -> None:
        """Translate and score every job, in batches numbered in order (the noise follows the number).

        Under torchrun the batches go round the processes: in each round of `world` batches, process
        k translates batch k of the round; the main process gathers the round's outputs and scores
        them in batch order, so every number equals the one-process evaluation's. Only the main
        process writes images and accumulates metrics.
        """
        world, rank = distributed.world_size(), distributed.rank()
        round_: list[list[Job]] = []
        for batch in _batches(jobs, self.batch_size):
            round_.append(batch)
            if len(round_) == world:
                self._round(round_, rank, progress)
                round_ = []
        if round_:
            self._round(round_, rank, progress)

    def _round(self, batches: list[list[Job]], rank: int, progress: Callable[[int], None] | None) -> None:
        first = self.batches_done
        self.batches_done += len(batches)
        mine = self._outputs(batches[rank], first + rank) if rank < len(batches) else None
        gathered = distributed.gather_to_main(mine)
        if gathered is None:  # not the main process
            return
        for jobs, packed in zip(batches, gathered, strict=False):
            self._batch(jobs, packed)
            if progress:
                progress(len(jobs))

    def results(self) -> dict[str, dict[str, Any]]:
        model = self.suites["model"].result()
        results = {}
        for name, suite in self.suites.items():
            same = name == "model" or name in self.same_as_model
            results[name] = dict(model) if same else suite.result()
        return results
