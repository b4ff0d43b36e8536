"""Device selection: CUDA when present, else CPU; never assume a GPU."""

from __future__ import annotations

import re

import torch

from midms_cli.errors import MidmsError


def resolve_device(name: str = "auto") -> torch.device:
    """Turn `auto`, `cpu`, `cuda` or `cuda:N` into a torch.device, checking that it exists."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if not match:
        raise MidmsError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise MidmsError(f"device {name!r} requested but CUDA is not available here; use --device cpu")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise MidmsError(
            f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s); "
            "use --device cuda:0 or --device cpu"
        )
    return torch.device("cuda", index)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype to use on `device` when AMP is requested (None: stay in fp32)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None
