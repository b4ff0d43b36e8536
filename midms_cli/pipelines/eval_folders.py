"""`evaluate_folders`: FID / KID / SWD of a folder of generated images against a folder of real ones.

Writes `protocol.json` and `results.json` into the output folder when one is given.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from midms_cli.errors import MidmsError
from midms_cli.images import load_image
from midms_cli.metrics import METRICS, NETWORK_WEIGHTS, select_metrics
from midms_cli.metrics.fid import image_set_hash
from midms_cli.metrics.protocol import protocol_record, weights_hashes, write_json
from midms_cli.metrics.suite import CachedSet, MetricSuite
from midms_cli.paths import midms_home

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
Report = Callable[[str], None]


def _stderr(message: str) -> None:
    sys.stderr.write(message + "\n")


def provided_weights(networks: dict[str, torch.nn.Module] | None) -> set[str]:
    """Registry weights made unnecessary by networks the caller passes in (tests, notebooks)."""
    return {weight for name in (networks or {}) for weight in NETWORK_WEIGHTS.get(name, ())}


def metric_weights(metrics: Sequence[str], networks: dict[str, torch.nn.Module] | None) -> list[str]:
    """The registry weights the chosen metrics will load (their hashes go into protocol.json)."""
    provided = provided_weights(networks)
    return sorted({w for name in metrics for w in METRICS[name].weights if w not in provided})


def stats_cache(name: str) -> Path:
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
    chosen = select_metrics(metrics, folders=True, provided=provided_weights(networks), report=report)
    if not chosen:
        raise MidmsError("no metric can run: add the weights named above, or ask for --metrics swd")
    if size is None:
        size = load_image(fake_files[0]).shape[-1]
    device = device or torch.device("cpu")
    hashes = weights_hashes(metric_weights(chosen, networks))

    # Accumulate both sets.
    cache = {}
    if "inception" not in (networks or {}) and {"fid", "kid"} & set(chosen):
        key = image_set_hash(real_files, extra=f"{hashes.get('inception-fid')}:{size}")
        cache["source"] = CachedSet(stats_cache(key), key)
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
