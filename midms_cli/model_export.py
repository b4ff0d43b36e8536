"""One midms model file for inference, from a model file or a training run, with the sampler it ships.

A run's checkpoints carry the sampler the model was trained with; the exported file may sample
differently (fewer re-warps, another warp temperature), which is stored in its config, so that
`midms translate` and `midms eval` use it with no option. Float16 weights halve the file; they are
upcast to the compute precision when the file is loaded.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

from midms_cli.atomic import check_output_files
from midms_cli.checkpoint import read_metadata, save_modules
from midms_cli.config import ModelConfig, SamplingConfig
from midms_cli.errors import ConfigError, MidmsError
from midms_cli.weights import sha256_file

PROVENANCE_KEYS = ("command", "created", "trained_by", "dataset")


def parse_sampling(assignments: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings -> SamplingConfig fields; VALUE is JSON (`tau=0.03`, `rewarp_positions=[]`)
    or else a bare string (`refine=none`). Unknown keys are a user error."""
    names = {field.name for field in dataclasses.fields(SamplingConfig)}
    values: dict[str, Any] = {}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        key = key.strip()
        if not sep or not key:
            raise MidmsError(
                f"--sampling {assignment!r}: write KEY=VALUE, e.g. tau=0.03 or rewarp_positions=[]"
            )
        if key not in names:
            raise MidmsError(
                f"--sampling {key}: no such sampler setting; choose from {', '.join(sorted(names))}"
            )
        try:
            values[key] = json.loads(text)
        except json.JSONDecodeError:
            values[key] = text
    return values


def export_model(
    source: Path, out: Path, *, half: bool = False, sampling: dict[str, Any] | None = None,
    trained_by: str | None = None, extra_metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `out` from the model file or run `source`; returns what was written.
    `extra_metadata`: more metadata entries (e.g. the training demo's profile)."""
    from midms_cli.pipelines.translate import MODEL_KIND, load_midm, resolve_model_file

    path = resolve_model_file(source)
    model = load_midm(path, "cpu")
    if sampling:
        stored = model.config.to_dict()
        stored["sampling"] = {**stored["sampling"], **sampling}
        try:
            model.config = ModelConfig.from_dict(stored)
        except ConfigError as exc:
            raise MidmsError(f"--sampling: {exc}") from None
    check_output_files([out], "-o")  # after every check of the inputs: a notice, then the file
    if half:
        model = copy.deepcopy(model).half()
    metadata = read_metadata(path, expected_kind=MODEL_KIND)
    provenance = {key: metadata[key] for key in PROVENANCE_KEYS if key in metadata}
    extra: dict[str, Any] = {
        "source": {"file": path.name, "sha256": sha256_file(path), **provenance},
        "weights_dtype": "float16" if half else "float32",
    }
    if trained_by:
        extra["trained_by"] = trained_by
    elif "trained_by" in metadata:
        extra["trained_by"] = metadata["trained_by"]
    save_modules(out, model.modules_to_save(), model.config, MODEL_KIND, {**extra, **(extra_metadata or {})})
    return {
        "model": str(out),
        "source": str(path),
        "megabytes": round(out.stat().st_size / 2**20, 2),
        "weights_dtype": extra["weights_dtype"],
        "sampling": dataclasses.asdict(model.config.sampling),
    }
