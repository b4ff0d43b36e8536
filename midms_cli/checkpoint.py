"""Checkpoints as safetensors files: model weights, training state and run directories.

No pickle anywhere: tensors go into the safetensors body, everything else (config, optimizer
hyper-parameters, RNG states, step) into JSON strings in the safetensors metadata. Files are
written atomically and validated on load, so a truncated or foreign file is one clear user error.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import re
import struct
import sys
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import midms_cli
from midms_cli.atomic import atomic_path
from midms_cli.errors import MidmsError

# Version of the layout below; bump it (and describe the change in CHANGELOG.md) whenever a
# reader of the old version would misread the new files.
FORMAT_VERSION = 1
FORMAT_NAME = "midms"
TRAINING_STATE_KIND = "training-state"
# Metadata keys written by this module; callers' metadata may not use them.
RESERVED_KEYS = ("format", "format_version", "kind", "package_version", "command", "created")

# safetensors refuses headers above 100 MB; a larger claim means the file is not safetensors.
_MAX_HEADER_BYTES = 100_000_000
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}


@dataclass
class Checkpoint:
    """A loaded checkpoint: its tensors (on CPU), decoded metadata and kind."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    kind: str
    path: Path | None = None


# --------------------------------------------------------------------------------------------
# Writing


def _independent_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that share no storage (safetensors refuses aliases, e.g. tied weights)."""
    seen: set[int] = set()
    result = {}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"checkpoint entry {name!r} is a {type(tensor).__name__}, not a tensor")
        tensor = tensor.detach().cpu().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer and pointer in seen:
            tensor = tensor.clone()
            pointer = tensor.untyped_storage().data_ptr()
        seen.add(pointer)
        result[name] = tensor
    return result


def recorded_command(argv: list[str] | None = None) -> list[str]:
    """The command line as a user would type it again: `midms ARGS` (also for `python -m midms_cli`
    and an absolute path to the script), else the program's file name and its arguments.

    Never the absolute path of the interpreter or script: that names the machine, not the recipe.
    """
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return []
    program = Path(argv[0]).name
    if program in ("midms", "__main__.py", "-m"):
        program = "midms"
    return [program, *argv[1:]]


def provenance(kind: str) -> dict[str, Any]:
    """What identifies a file as ours and records how it was made (style: record what reproduces)."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "package_version": midms_cli.__version__,
        "command": recorded_command(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def save_checkpoint(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any], kind: str
) -> None:
    """Write `tensors` and JSON-encoded `metadata` atomically as one safetensors file."""
    clashes = sorted(set(metadata) & set(RESERVED_KEYS))
    if clashes:
        raise ValueError(f"metadata keys {clashes} are reserved for the checkpoint format")
    header = {**metadata, **provenance(kind)}
    encoded = {key: json.dumps(value, sort_keys=True) for key, value in header.items()}
    prepared = _independent_tensors(tensors)
    with atomic_path(path) as tmp:
        try:
            save_file(prepared, tmp, metadata=encoded)
        except SafetensorError as exc:
            # safetensors reports a failed write (a full disk) as its own error type, with the
            # system's error number in the text; as an OSError the atomic writer says what to do.
            number = re.search(r"os error (\d+)", str(exc))
            if number is None:
                raise
            code = int(number.group(1))
            raise OSError(code, os.strerror(code), str(path)) from exc


# --------------------------------------------------------------------------------------------
# Reading and validation


def _corrupt(path: Path, detail: str) -> MidmsError:
    return MidmsError(
        f"checkpoint {path} is truncated or corrupt ({detail}); re-save it or use an earlier checkpoint"
    )


def _read_header(path: Path) -> dict[str, Any]:
    """Parse and check a safetensors header: every tensor's byte range must lie inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, f"{size} bytes, shorter than a safetensors header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER_BYTES:
                raise MidmsError(f"{path} is not a safetensors file (not a midms checkpoint)")
            if header_len > size - 8:
                raise _corrupt(path, f"header claims {header_len} bytes, only {size - 8} follow")
            raw = handle.read(header_len)
    except FileNotFoundError:
        raise MidmsError(f"checkpoint not found: {path}") from None
    except IsADirectoryError:
        raise MidmsError(f"checkpoint path is a directory, not a file: {path}") from None
    except PermissionError:
        raise MidmsError(f"cannot read checkpoint {path}: permission denied") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MidmsError(f"{path} is not a safetensors file (not a midms checkpoint)") from None
    if not isinstance(header, dict):
        raise MidmsError(f"{path} is not a safetensors file (not a midms checkpoint)")
    data_size = size - 8 - header_len
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            count = int(np.prod(entry["shape"], dtype=np.int64))
            expected = count * _DTYPE_BYTES[entry["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, f"malformed entry for tensor {name!r}") from None
        if not 0 <= begin <= end or end - begin != expected:
            raise _corrupt(path, f"tensor {name!r} has an inconsistent byte range")
        if end > data_size:
            raise _corrupt(path, f"tensor {name!r} ends at byte {end} but the data section has {data_size}")
    return header


def _decode_metadata(path: Path, header: dict[str, Any]) -> dict[str, Any]:
    raw = header.get("__metadata__") or {}
    if raw.get("format") != json.dumps(FORMAT_NAME):
        raise MidmsError(
            f"{path} is a safetensors file without midms metadata (not a midms checkpoint); "
            "import third-party weights with `midms weights`"
        )
    try:
        metadata = {key: json.loads(value) for key, value in raw.items()}
    except (TypeError, json.JSONDecodeError):
        raise _corrupt(path, "metadata is not valid JSON") from None
    version = metadata.get("format_version")
    if not isinstance(version, int):
        raise _corrupt(path, "format_version is missing")
    if version > FORMAT_VERSION:
        raise MidmsError(
            f"{path} was written by a newer midms (checkpoint format {version}, this version reads up to "
            f"{FORMAT_VERSION}); upgrade midms"
        )
    return metadata


def _check_kind(path: Path, kind: str, expected_kind: str | None) -> None:
    if expected_kind is not None and kind != expected_kind:
        raise MidmsError(f"{path} holds a {kind!r} checkpoint, expected {expected_kind!r}")


def read_metadata(path: str | os.PathLike, expected_kind: str | None = None) -> dict[str, Any]:
    """The decoded metadata of a checkpoint without loading its tensors (cheap)."""
    path = Path(path)
    metadata = _decode_metadata(path, _read_header(path))
    _check_kind(path, str(metadata.get("kind")), expected_kind)
    return metadata


def load_checkpoint(path: str | os.PathLike, expected_kind: str | None = None) -> Checkpoint:
    """Load a midms checkpoint; any truncated, foreign, newer or wrong-kind file is a MidmsError."""
    path = Path(path)
    metadata = read_metadata(path, expected_kind)
    try:
        tensors = load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _corrupt(path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    return Checkpoint(tensors=tensors, metadata=metadata, kind=metadata["kind"], path=path)


# --------------------------------------------------------------------------------------------
# Modules


def save_modules(
    path: str | os.PathLike,
    modules: Mapping[str, torch.nn.Module],
    config: Any,
    kind: str,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Save each module's state dict under "<prefix>." with the config JSON: the file alone rebuilds it."""
    tensors = {}
    for prefix, module in modules.items():
        for name, tensor in module.state_dict().items():
            tensors[f"{prefix}.{name}"] = tensor
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    save_checkpoint(path, tensors, {"config": config, **(extra or {})}, kind)


def module_state(ckpt: Checkpoint, prefix: str) -> dict[str, torch.Tensor]:
    """The sub-state-dict stored under "<prefix>." (prefix removed)."""
    start = prefix + "."
    return {name[len(start):]: tensor for name, tensor in ckpt.tensors.items() if name.startswith(start)}


def load_modules(
    path: str | os.PathLike,
    modules: Mapping[str, torch.nn.Module],
    expected_kind: str | None = None,
    strict: bool = True,
) -> dict[str, Any]:
    """Load each module from its prefix of the checkpoint; returns the checkpoint's metadata."""
    ckpt = load_checkpoint(path, expected_kind)
    for prefix, module in modules.items():
        state = module_state(ckpt, prefix)
        if strict and not state:
            raise MidmsError(f"{ckpt.path} holds no weights for {prefix!r}; it was saved for another model")
        try:
            module.load_state_dict(state, strict=strict)
        except RuntimeError as exc:
            # torch lists one problem per line after a heading; the first one is enough to act on.
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            detail = (lines[1] if len(lines) > 1 else lines[0] if lines else "state dict mismatch")[:300]
            raise MidmsError(
                f"{ckpt.path} does not match the {prefix!r} model built from this config ({detail})"
            ) from None
    return ckpt.metadata


# --------------------------------------------------------------------------------------------
# Nested state without pickle: tensors become safetensors entries, the rest JSON.
# Markers are one-key dicts whose key starts with "$"; an ordinary dict that has such a key
# (or non-string keys) is itself stored as a "$dict" list of pairs, so decoding is unambiguous.


def flatten_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """JSON-ready structure of `obj`, its tensors moved into `tensors` under "<prefix>.<n>"."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}.{len(tensors)}"
        tensors[key] = obj.detach().cpu()
        return {"$tensor": key}
    if isinstance(obj, np.ndarray):
        key = f"{prefix}.{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {"$ndarray": key}
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj)
    if isinstance(obj, list):
        return [flatten_state(x, tensors, prefix) for x in obj]
    if isinstance(obj, tuple):
        return {"$tuple": [flatten_state(x, tensors, prefix) for x in obj]}
    if isinstance(obj, Counter):  # MultiStepLR's milestones must stay a Counter
        return {"$counter": [[flatten_state(k, tensors, prefix), v] for k, v in obj.items()]}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: flatten_state(v, tensors, prefix) for k, v in obj.items()}
        return {"$dict": [flatten_state([k, v], tensors, prefix) for k, v in obj.items()]}
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint without pickle")


def _hashable(key: Any) -> Any:
    return tuple(_hashable(x) for x in key) if isinstance(key, list) else key


def unflatten_state(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of `flatten_state`."""
    if isinstance(obj, list):
        return [unflatten_state(x, tensors) for x in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        (marker, value), = obj.items()
        if marker == "$tensor":
            return tensors[value]
        if marker == "$ndarray":
            return tensors[value].numpy()
        if marker == "$tuple":
            return tuple(unflatten_state(x, tensors) for x in value)
        if marker == "$counter":
            return Counter({_hashable(unflatten_state(k, tensors)): v for k, v in value})
        if marker == "$dict":
            return {_hashable(unflatten_state(k, tensors)): unflatten_state(v, tensors) for k, v in value}
    return {k: unflatten_state(v, tensors) for k, v in obj.items()}


# --------------------------------------------------------------------------------------------
# RNG states


def get_rng_state() -> dict[str, Any]:
    """Python, NumPy (legacy global), torch CPU and (when present) CUDA generator states."""
    version, internal, gauss = random.getstate()
    algorithm, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {
            "algorithm": algorithm,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `get_rng_state` returned. CUDA states are skipped when CUDA is absent."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    np_state = state["numpy"]
    keys = np_state["keys"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((
        np_state["algorithm"], keys.astype(np.uint32), int(np_state["pos"]),
        int(np_state["has_gauss"]), float(np_state["cached_gaussian"]),
    ))
    torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        for index, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.to(torch.uint8).cpu(), index)


# --------------------------------------------------------------------------------------------
# Training state


def save_training_state(
    path: str | os.PathLike,
    *,
    optimizers: Mapping[str, torch.optim.Optimizer],
    schedulers: Mapping[str, Any],
    step: int,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Optimizer and scheduler state dicts, the step, RNG states and `extra` (e.g. data position)."""
    tensors: dict[str, torch.Tensor] = {}
    metadata = {
        "step": int(step),
        "optimizers": flatten_state({n: o.state_dict() for n, o in optimizers.items()}, tensors, "optim"),
        "schedulers": flatten_state({n: s.state_dict() for n, s in schedulers.items()}, tensors, "sched"),
        "rng": flatten_state(get_rng_state(), tensors, "rng"),
        "extra": flatten_state(dict(extra or {}), tensors, "extra"),
    }
    save_checkpoint(path, tensors, metadata, TRAINING_STATE_KIND)


def _check_names(path: Path, what: str, stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> None:
    if set(stored) != set(wanted):
        raise MidmsError(
            f"{path} holds {what} {sorted(stored)} but this run has {sorted(wanted)}; "
            "it belongs to a different training setup"
        )


def load_training_state(
    path: str | os.PathLike,
    optimizers: Mapping[str, torch.optim.Optimizer],
    schedulers: Mapping[str, Any],
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore optimizers, schedulers and RNG states in place; returns {"step": int, "extra": dict}."""
    ckpt = load_checkpoint(path, expected_kind=TRAINING_STATE_KIND)
    meta = ckpt.metadata
    optimizer_states = unflatten_state(meta["optimizers"], ckpt.tensors)
    scheduler_states = unflatten_state(meta["schedulers"], ckpt.tensors)
    _check_names(ckpt.path, "optimizers", optimizer_states, optimizers)
    _check_names(ckpt.path, "schedulers", scheduler_states, schedulers)
    for name, optimizer in optimizers.items():
        try:
            optimizer.load_state_dict(optimizer_states[name])
        except (ValueError, KeyError) as exc:
            raise MidmsError(f"{ckpt.path}: optimizer {name!r} does not match this model ({exc})") from None
    for name, scheduler in schedulers.items():
        scheduler.load_state_dict(scheduler_states[name])
    if restore_rng:
        set_rng_state(unflatten_state(meta["rng"], ckpt.tensors))
    return {"step": int(meta["step"]), "extra": unflatten_state(meta["extra"], ckpt.tensors)}


def __getattr__(name: str) -> Any:
    """`RunDir` lives in `midms_cli.rundir` (which uses this module's writers); still importable here."""
    if name == "RunDir":
        from midms_cli.rundir import RunDir

        return RunDir
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
