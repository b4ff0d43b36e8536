"""Strict loading of a published third-party state dict into one of our networks, with one-line errors.

A wrong file must fail before any inference, naming the first offending key, so the user knows to
re-add the right one with `midms weights add NAME FILE`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from midms_cli.errors import MidmsError


def _listing(keys: list[str]) -> str:
    more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
    return f"{keys[0]!r}{more}"


def check_state_dict(
    module: nn.Module, tensors: Mapping[str, torch.Tensor], weight_name: str, derived: Iterable[str] = ()
) -> None:
    """MidmsError unless `tensors` has exactly the keys and shapes of `module`'s state dict.

    `derived` keys (constants the config determines, e.g. Swin's relative position index) may be
    absent; when present they must equal the module's own values.
    """
    expected = module.state_dict()
    derived = set(derived)
    hint = f"re-add the original file with `midms weights add {weight_name} FILE`"
    missing = sorted(k for k in expected if k not in tensors and k not in derived)
    if missing:
        raise MidmsError(f"weights {weight_name!r} lack key {_listing(missing)}; {hint}")
    unexpected = sorted(k for k in tensors if k not in expected)
    if unexpected:
        raise MidmsError(f"weights {weight_name!r} have unexpected key {_listing(unexpected)}; {hint}")
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise MidmsError(
                f"weights {weight_name!r}: {key!r} has shape {tuple(value.shape)}, "
                f"expected {tuple(expected[key].shape)}; {hint}"
            )
        if key in derived and not torch.equal(value.to(expected[key].dtype), expected[key]):
            raise MidmsError(f"weights {weight_name!r}: {key!r} differs from the architecture's own; {hint}")


def load_published(
    module: nn.Module, tensors: Mapping[str, torch.Tensor], weight_name: str, derived: Iterable[str] = ()
) -> nn.Module:
    """Check (see `check_state_dict`) then copy `tensors` into `module`; returns the module."""
    derived = set(derived)
    check_state_dict(module, tensors, weight_name, derived)
    module.load_state_dict({k: v for k, v in tensors.items() if k not in derived}, strict=False)
    return module
