"""Exponential moving average of the trained weights, saved with checkpoints and swapped in to sample."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class EMA(nn.Module):
    """Exponential moving average of a module's floating-point parameters (buffers, saved as `ema.`)."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        super().__init__()
        self.decay = decay
        # Only what is trained: frozen parts (the first stage) would average to themselves.
        self._names = [
            name for name, p in module.named_parameters() if p.is_floating_point() and p.requires_grad
        ]
        params = dict(module.named_parameters())
        for name in self._names:
            self.register_buffer(name.replace(".", "__"), params[name].detach().clone())

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        params = dict(module.named_parameters())
        for name in self._names:
            getattr(self, name.replace(".", "__")).lerp_(params[name].detach(), 1 - self.decay)

    @contextlib.contextmanager
    def swapped_into(self, module: nn.Module) -> Iterator[None]:
        """Temporarily load the averaged weights into `module` (for sampling and export)."""
        params = dict(module.named_parameters())
        saved = {name: params[name].detach().clone() for name in self._names}
        with torch.no_grad():
            for name in self._names:
                params[name].copy_(getattr(self, name.replace(".", "__")))
        try:
            yield
        finally:
            with torch.no_grad():
                for name in self._names:
                    params[name].copy_(saved[name])
