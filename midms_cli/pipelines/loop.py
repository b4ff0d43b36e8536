"""The shared training loop of pretraining, warm-up and MIDMs training.

One process or many under torchrun (DistributedDataParallel, gloo on CPU); rank 0 logs, writes
checkpoints, metrics and sample grids. A run directory resumes exactly: model, optimizers,
schedulers, step, and the data stream (a pure function of seed, step and rank, see `DataStream`).
A process killed at any point leaves the newest complete checkpoint current and temporary files
that the next run removes.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from midms_cli import distributed
from midms_cli.checkpoint import load_modules, load_training_state
from midms_cli.devices import autocast_dtype, resolve_device
from midms_cli.errors import MidmsError
from midms_cli.images import save_png

# The data stream, the run's files, EMA and interrupts live in their own modules; their names stay
# importable here.
from midms_cli.pipelines.datastream import (  # noqa: F401
    DATA_SEGMENT,
    DataStream,
    endless_epochs,
    seed_everything,
    shard_loader,
    step_seed,
)
from midms_cli.pipelines.ema import EMA
from midms_cli.pipelines.interrupts import StopFlag
from midms_cli.pipelines.runfiles import (  # noqa: F401
    CONFIG_FILE,
    METRICS_FILE,
    SAMPLES_DIR,
    TRACE_FILE,
    append_jsonl,
    parameter_checksum,
    read_run_config,
    remove_run_temporaries,
    sample_grid,
    sample_keys,
    to_device,
    truncate_jsonl,
    write_run_config,
)
from midms_cli.rundir import RunDir

_console = Console(stderr=True)


@dataclass
class LoopOptions:
    """How long and how to train; the model-specific parts live in the task."""

    out: Path
    max_iters: int
    batch_size: int = 1
    seed: int = 2021
    grad_accumulation: int = 1
    grad_clip: float = 0.0  # 0: no clipping
    ema_decay: float = 0.0  # 0: no EMA
    amp: bool = False  # mixed precision: CUDA, or bfloat16 on CPUs that have it natively
    nan_patience: int = 10
    log_every: int = 10
    checkpoint_every: int = 1000
    sample_every: int = 500
    keep_checkpoints: int = 3
    data_segment: int = DATA_SEGMENT
    trace: bool = False
    progress: bool = True
    # Called after every completed step with the step number (tests use it to simulate a kill).
    on_step: Callable[[int], None] | None = field(default=None, repr=False)


class TrainingTask(Protocol):
    """What a pipeline hands to the loop.

    `model` is the nn.Module DDP wraps: forward(batch) returns a dict of scalar losses whose
    "loss" entry is the total. `modules` are saved under their prefixes in every checkpoint.
    """

    kind: str
    config: dict[str, Any]
    model: nn.Module
    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, Any]
    ema_module: nn.Module | None

    def sample_columns(self, batch: dict[str, Any]) -> list[torch.Tensor]: ...

    def export(self, path: Path) -> None: ...


@dataclass
class LoopResult:
    step: int
    interrupted: bool
    nonfinite_skipped: int
    last_losses: dict[str, float]
    final_model: Path | None
    signal: int | None = None  # the signal that stopped an interrupted run (SIGINT, SIGTERM)


def setup_device(name: str = "auto") -> torch.device:
    """Join the process group when under torchrun; each rank gets its own device (else `name`)."""
    distributed.init()
    if distributed.world_size() > 1:
        return distributed.device_for_rank()
    return resolve_device(name)


@contextlib.contextmanager
def _bar(progress: Progress, console: Console) -> Iterator[None]:
    """The progress bar around the loop; a failed run ends with its error line, not a half-drawn bar."""
    quiet = console.quiet
    try:
        with progress:
            try:
                yield
            except BaseException:
                console.quiet = True  # what the bar would draw as it closes is left out
                raise
    finally:
        console.quiet = quiet


# --------------------------------------------------------------------------------------------
# The loop


class Trainer:
    """Runs a TrainingTask for LoopOptions.max_iters optimizer steps; see `run`."""

    def __init__(
        self,
        task: TrainingTask,
        options: LoopOptions,
        make_loader: Callable[[int], Iterable],
        device: torch.device,
    ) -> None:
        self.task, self.options, self.device = task, options, device
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.main = distributed.is_main()
        self.run_dir = RunDir(options.out, keep=options.keep_checkpoints)
        self.data = DataStream(make_loader, options.seed, options.data_segment, self.rank)
        self.ema = (
            EMA(task.ema_module, options.ema_decay).to(device)
            if (options.ema_decay > 0 and task.ema_module is not None)
            else None
        )
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_streak = 0
        self.wrapped = self._wrap(task.model)
        dtype = autocast_dtype(device) if options.amp else None
        self.amp_dtype = dtype
        self.scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    def _wrap(self, model: nn.Module) -> nn.Module:
        model.to(self.device)
        if self.world > 1 and any(p.requires_grad for p in model.parameters()):
            ids = [self.device.index] if self.device.type == "cuda" else None
            # find_unused_parameters as the official code: some branches skip parts of the model.
            return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
        return model

    def _saved_modules(self) -> dict[str, nn.Module]:
        modules = dict(self.task.modules)
        if self.ema is not None:
            modules["ema"] = self.ema
        return modules

    # Resume.

    def resume(self) -> bool:
        """Load the newest checkpoint that has its training state beside it, if any; True when resumed.

        A checkpoint without its state (the process was killed between the two files) is not a step
        to resume from; with no complete pair at all the run starts again from step 0.
        """
        pair = self.run_dir.latest_resumable()
        if pair is None:
            if self.main and self.run_dir.steps():
                _console.print(
                    f"{self.run_dir.path} holds no checkpoint with its training state (an interrupted "
                    "first save); starting from step 0",
                    highlight=False,
                )
            return False
        checkpoint, state = pair
        load_modules(checkpoint, self._saved_modules(), expected_kind=self.task.kind)
        loaded = load_training_state(state, self.task.optimizers, self.task.schedulers)
        self.step = loaded["step"]
        extra = loaded["extra"]
        self.nonfinite_total = int(extra.get("nonfinite_total", 0))
        self.nonfinite_streak = int(extra.get("nonfinite_streak", 0))
        # Runs saved before the segment was recorded cut their data by the checkpoint interval.
        segment = extra.get("data_segment", self.options.checkpoint_every * self.options.grad_accumulation)
        self.data = DataStream(self.data.make_loader, self.options.seed, int(segment), self.rank)
        return True

    def save(self) -> Path | None:
        if self.main:
            path = self.run_dir.save(
                self.step,
                self._saved_modules(),
                self.task.config,
                kind=self.task.kind,
                optimizers=self.task.optimizers,
                schedulers=self.task.schedulers,
                state_extra={
                    "data_position": self.step * self.options.grad_accumulation,
                    "data_segment": self.data.segment,
                    "nonfinite_total": self.nonfinite_total,
                    "nonfinite_streak": self.nonfinite_streak,
                },
            )
        else:
            path = None
        distributed.barrier()
        return path

    # One optimizer step.

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _micro_step(self, index: int, last: bool) -> tuple[dict[str, float], bool, dict[str, Any]]:
        batch = to_device(self.data.batch(index), self.device)
        # Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation.
        sync = (
            contextlib.nullcontext()
            if last or not hasattr(self.wrapped, "no_sync")
            else self.wrapped.no_sync()
        )
        with sync:
            with self._autocast():
                losses = self.wrapped(batch)
            loss = losses["loss"] / self.options.grad_accumulation
            finite = bool(torch.isfinite(loss.detach()).all())
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
        return {k: float(v.detach()) for k, v in losses.items()}, finite, batch

    def train_step(self) -> tuple[dict[str, float], dict[str, Any], bool]:
        """Accumulate, check for NaN/inf on every rank, clip, step. Returns (losses, last batch, stepped)."""
        seed_everything(step_seed(self.options.seed, self.step, self.rank))
        for optimizer in self.task.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        all_finite = True
        accumulation = self.options.grad_accumulation
        for micro in range(accumulation):
            index = self.step * accumulation + micro
            losses, finite, batch = self._micro_step(index, last=micro == accumulation - 1)
            all_finite &= finite
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + value / accumulation
        params = [p for p in self.task.model.parameters() if p.requires_grad and p.grad is not None]
        if self.scaler is not None:
            for optimizer in self.task.optimizers.values():
                self.scaler.unscale_(optimizer)
        clip = self.options.grad_clip if self.options.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip) if params else torch.zeros(())
        all_finite &= bool(torch.isfinite(grad_norm))
        # Every rank must agree to skip, or the replicas drift apart.
        flag = torch.tensor([0.0 if all_finite else 1.0], device=self.device)
        stepped = float(distributed.all_reduce_mean(flag)) == 0.0
        if stepped:
            for optimizer in self.task.optimizers.values():
                if self.scaler is not None:
                    self.scaler.step(optimizer)
                else:
                    optimizer.step()
            if self.ema is not None:
                self.ema.update(self.task.ema_module)
        if self.scaler is not None:
            self.scaler.update()  # also after a skip: it lowers the loss scale and resets unscale_
        for scheduler in self.task.schedulers.values():
            scheduler.step()
        self.step += 1
        return totals, batch, stepped

    def _check_nonfinite(self, stepped: bool, losses: dict[str, float]) -> None:
        if stepped:
            self.nonfinite_streak = 0
            return
        self.nonfinite_total += 1
        self.nonfinite_streak += 1
        if self.main:
            _console.print(
                f"step {self.step}: non-finite loss or gradient, optimizer step skipped "
                f"({self.nonfinite_streak} in a row)",
                highlight=False,
            )
        if self.nonfinite_streak >= self.options.nan_patience:
            raise MidmsError(
                f"training stopped at step {self.step}: the loss or gradients were NaN/inf for "
                f"{self.nonfinite_streak} steps in a row (training.nan_patience); lower the learning rate, "
                "set a gradient clip, or resume from an earlier checkpoint"
            )

    # Logging.

    def _log(self, losses: dict[str, float], samples_per_sec: float) -> None:
        # Named parameter groups log as lr_<group name> (e.g. lr_unet), others as lr_<optimizer>_<index>.
        lrs = {
            f"lr_{group.get('name') or f'{name}_{i}'}": group["lr"]
            for name, opt in self.task.optimizers.items()
            for i, group in enumerate(opt.param_groups)
        }
        record = {
            "step": self.step,
            **losses,
            **lrs,
            "samples_per_sec": samples_per_sec,
            "nonfinite_skipped": self.nonfinite_total,
            "time": time.time(),
        }
        append_jsonl(Path(self.options.out) / METRICS_FILE, record)

    def _trace(self, batch: dict[str, Any], losses: dict[str, float]) -> None:
        record = {
            "step": self.step,
            "rank": self.rank,
            "keys": sample_keys(batch),
            "checksum": parameter_checksum(self.task.model),
            "loss": losses.get("loss"),
        }
        append_jsonl(Path(self.options.out) / TRACE_FILE.format(rank=self.rank), record)

    def write_samples(self, batch: dict[str, Any]) -> Path | None:
        if not self.main:
            return None
        model = self.task.ema_module
        context = self.ema.swapped_into(model) if self.ema is not None else contextlib.nullcontext()
        with context, torch.no_grad():
            columns = self.task.sample_columns(batch)
        path = Path(self.options.out) / SAMPLES_DIR / f"step-{self.step:08d}.png"
        save_png(sample_grid(columns), path)
        return path

    def export(self) -> Path | None:
        """The final model file `model.safetensors` (EMA weights when EMA is on)."""
        if not self.main:
            distributed.barrier()
            return None
        path = Path(self.options.out) / "model.safetensors"
        model = self.task.ema_module
        context = self.ema.swapped_into(model) if self.ema is not None else contextlib.nullcontext()
        with context:
            self.task.export(path)
        distributed.barrier()
        return path

    # Main loop.

    def run(self) -> LoopResult:
        """Train until max_iters (or a stop request); checkpoints, logs and samples on the way."""
        options, out = self.options, Path(self.options.out)
        if self.main:
            remove_run_temporaries(out)
        resumed = self.resume()
        if self.main:
            out.mkdir(parents=True, exist_ok=True)
            truncate_jsonl(out / METRICS_FILE, self.step)
            for rank in range(self.world) if options.trace else ():
                truncate_jsonl(out / TRACE_FILE.format(rank=rank), self.step)
            if resumed:
                _console.print(f"resuming {out} from step {self.step}", highlight=False)
        distributed.barrier()
        self.task.model.train()
        losses: dict[str, float] = {}
        interrupted = False
        stopped_by: int | None = None
        last_batch: dict[str, Any] | None = None
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=_console,
            disable=not (self.main and options.progress),
            transient=False,
        )
        samples_per_step = options.batch_size * options.grad_accumulation * self.world
        with StopFlag() as stop, _bar(progress, _console):
            bar = progress.add_task(self.task.kind, total=options.max_iters, completed=self.step, status="")
            window_start, window_steps = time.perf_counter(), 0
            while self.step < options.max_iters:
                # Train.
                losses, last_batch, stepped = self.train_step()
                self._check_nonfinite(stepped, losses)
                window_steps += 1
                rate = samples_per_step * window_steps / max(time.perf_counter() - window_start, 1e-9)
                progress.update(
                    bar,
                    completed=self.step,
                    status=f"loss {losses.get('loss', float('nan')):.4f}  {rate:.1f} samples/s",
                )
                # Log, trace, sample, checkpoint.
                if options.trace:
                    self._trace(last_batch, losses)
                if self.main and (self.step % options.log_every == 0 or self.step == options.max_iters):
                    self._log(losses, rate)
                    window_start, window_steps = time.perf_counter(), 0
                if options.sample_every > 0 and self.step % options.sample_every == 0:
                    self.write_samples(last_batch)
                if options.on_step is not None:
                    options.on_step(self.step)
                # Stop requests come per rank (a signal); all ranks must leave together.
                flag = torch.tensor([1.0 if stop.requested else 0.0], device=self.device)
                stop_now = float(distributed.all_reduce_mean(flag)) > 0
                if self.step % options.checkpoint_every == 0 or stop_now:
                    self.save()
                if stop_now:
                    interrupted = self.step < options.max_iters
                    stopped_by = stop.signum if stop.signum is not None else signal.SIGTERM
                    break
        final = None
        if not interrupted:
            if self.run_dir.latest_step(with_state=True) != self.step:
                self.save()
            sampled_last_step = options.sample_every > 0 and self.step % options.sample_every == 0
            if last_batch is not None and not sampled_last_step:  # the loop may have just written it
                self.write_samples(last_batch)
            final = self.export()
        if self.main and interrupted:
            _console.print(
                f"interrupted: checkpoint saved at step {self.step}; run the same command to resume",
                highlight=False,
            )
        return LoopResult(
            self.step, interrupted, self.nonfinite_total, losses, final, stopped_by if interrupted else None
        )
