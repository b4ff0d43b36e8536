"""Run directories: numbered checkpoints with their training state, a `latest` pointer, pruning.

Every file is written atomically, so one that exists is whole; a process killed between two of
them leaves the newest complete step current (the pointer moves last, and a checkpoint without its
training state is never a step to resume from).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

# Through the module, so the writers are looked up when called (tests replace one to simulate a crash).
from midms_cli import checkpoint
from midms_cli.atomic import write_text

_STEP_FILE = re.compile(r"^(ckpt|state)-(\d{8,})\.safetensors$")


class RunDir:
    """A run directory keeping the last `keep` checkpoints and a `latest` pointer (JSON).

    Files: `ckpt-{step:08d}.safetensors` (modules + config), `state-{step:08d}.safetensors`
    (training state, optional) and `latest`. Only the main process should call `save`.
    """

    def __init__(self, path: str | os.PathLike, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.path = Path(path)
        self.keep = keep

    def checkpoint_path(self, step: int) -> Path:
        return self.path / f"ckpt-{step:08d}.safetensors"

    def state_path(self, step: int) -> Path:
        return self.path / f"state-{step:08d}.safetensors"

    @property
    def pointer_path(self) -> Path:
        return self.path / "latest"

    def save(
        self,
        step: int,
        modules: Mapping[str, torch.nn.Module],
        config: Any,
        *,
        kind: str = "midms",
        extra: Mapping[str, Any] | None = None,
        optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
        schedulers: Mapping[str, Any] | None = None,
        state_extra: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write the checkpoint (and training state when optimizers are given), then the pointer, then prune.

        The pointer moves only after both files are complete, so a crash leaves the previous step current.
        """
        model_file = self.checkpoint_path(step)
        checkpoint.save_modules(model_file, modules, config, kind, {"step": int(step), **(extra or {})})
        state = None
        if optimizers is not None:
            state = self.state_path(step)
            checkpoint.save_training_state(
                state, optimizers=optimizers, schedulers=schedulers or {}, step=step, extra=state_extra
            )
        pointer = {"step": int(step), "checkpoint": model_file.name, "state": state.name if state else None}
        write_text(self.pointer_path, json.dumps(pointer, indent=2) + "\n")
        self._prune(step)
        return model_file

    def steps(self, *, with_state: bool = False) -> list[int]:
        """Steps that have a checkpoint file (with_state: and a training state file), ascending."""
        if not self.path.is_dir():
            return []
        found: dict[str, set[int]] = {"ckpt": set(), "state": set()}
        for entry in self.path.iterdir():
            match = _STEP_FILE.match(entry.name)
            if match:
                found[match.group(1)].add(int(match.group(2)))
        steps = found["ckpt"] & found["state"] if with_state else found["ckpt"]
        return sorted(steps)

    def _pointer(self, with_state: bool) -> dict[str, Any] | None:
        try:
            pointer = json.loads(self.pointer_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(pointer, dict) or not (self.path / str(pointer.get("checkpoint"))).is_file():
            return None
        if with_state and not (pointer.get("state") and (self.path / str(pointer["state"])).is_file()):
            return None
        if not isinstance(pointer.get("step"), int):
            return None
        return pointer

    def latest_step(self, *, with_state: bool = False) -> int | None:
        """The newest complete step: the pointer's, else (pointer lost or not written yet) the highest
        step on disk whose files are all there; with_state, a step needs its training state too.

        Files are written atomically, so one that exists is whole; a process killed between the
        checkpoint and its state leaves a checkpoint alone, which with_state never counts.
        """
        pointer = self._pointer(with_state)
        if pointer is not None:
            return int(pointer["step"])
        steps = self.steps(with_state=with_state)
        return steps[-1] if steps else None

    def latest(self) -> Path | None:
        """The newest model checkpoint, or None when the run has none."""
        step = self.latest_step()
        return None if step is None else self.checkpoint_path(step)

    def latest_state(self) -> Path | None:
        """The training state saved with the newest checkpoint, or None."""
        step = self.latest_step()
        if step is None:
            return None
        state = self.state_path(step)
        return state if state.is_file() else None

    def latest_resumable(self) -> tuple[Path, Path] | None:
        """(checkpoint, training state) of the newest step that has both, or None."""
        step = self.latest_step(with_state=True)
        return None if step is None else (self.checkpoint_path(step), self.state_path(step))

    def _prune(self, current: int) -> None:
        kept = set([s for s in self.steps() if s <= current][-self.keep:]) | {current}
        for file in self.path.iterdir():
            match = _STEP_FILE.match(file.name)
            if match and int(match.group(2)) not in kept:
                file.unlink(missing_ok=True)
