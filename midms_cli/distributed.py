"""All distributed logic in one place; without torchrun everything degrades to one process.

Under `torchrun` the environment carries RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; `init()` joins the process group (NCCL on CUDA, gloo on CPU). Without them, or with
WORLD_SIZE=1, no process group is created and every helper here is a cheap no-op.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from midms_cli.errors import MidmsError

# Whether this module created the process group (so that `cleanup` only destroys its own).
_owns_group = False
# Whether this process ran in a process group of more than one (see `ended_process_group`).
_ran_distributed = False


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise MidmsError(f"environment variable {name}={value!r} is not an integer") from None


def is_distributed() -> bool:
    """True when a process group with more than one process is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init(backend: str | None = None, timeout_minutes: float = 30.0) -> bool:
    """Join the torchrun process group if the environment asks for one; returns True if distributed.

    Idempotent. The backend defaults to NCCL when CUDA is available, else gloo.
    """
    global _owns_group
    if dist.is_available() and dist.is_initialized():
        return is_distributed()
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return False
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise MidmsError(
            f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with `torchrun --nproc_per_node=N`"
        )
    if not dist.is_available():
        raise MidmsError("this torch build has no torch.distributed; run without torchrun")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        # Bind this process to its GPU before creating the group, as NCCL expects.
        torch.cuda.set_device(local_rank())
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=_env_int("RANK", 0),
        world_size=world,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    global _ran_distributed
    _owns_group = _ran_distributed = True
    return True


def rank() -> int:
    """Global rank (0 in one process)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 in one process)."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """Rank on this machine (torchrun's LOCAL_RANK; 0 in one process)."""
    return _env_int("LOCAL_RANK", 0) if _env_int("WORLD_SIZE", 1) > 1 else 0


def is_main() -> bool:
    """True on the process that writes files and prints results."""
    return rank() == 0


def barrier() -> None:
    """Wait for every process (no-op in one process)."""
    if is_distributed():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """A new tensor holding the mean of `tensor` over all ranks (floating point; identity in one process).

    Integer tensors are averaged in float32. The input is left unchanged.
    """
    result = tensor.detach().clone()
    if not result.is_floating_point():
        result = result.float()
    if not is_distributed():
        return result
    device = result.device
    if dist.get_backend() == "nccl":
        result = result.to(device_for_rank())
    dist.all_reduce(result, op=dist.ReduceOp.SUM)
    result /= dist.get_world_size()
    return result.to(device)


def rank_share(count: int, rank_: int | None = None, world: int | None = None) -> range:
    """The indices of `count` work items this rank handles: contiguous blocks whose sizes differ by
    at most one, in rank order (consecutive items often share an exemplar, which a block keeps)."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    base, extra = divmod(count, world)
    start = rank_ * base + min(rank_, extra)
    return range(start, start + base + (1 if rank_ < extra else 0))


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's picklable `obj` in rank order on the main process (None elsewhere); [obj] in one
    process. Only for small results (summaries, metric statistics): it is pickled in memory."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered if is_main() else None


def print0(*args: Any, **kwargs: Any) -> None:
    """`print` on the main process only."""
    if is_main():
        print(*args, **kwargs)


def device_for_rank() -> torch.device:
    """This process's device: cuda:LOCAL_RANK when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def ended_process_group() -> bool:
    """Whether this process ran in a torchrun process group (now left). Such a process should end
    with `os._exit` once its output is flushed: gloo's threads can abort it (SIGABRT, "terminate
    called without an active exception") while the interpreter tears down, after all work is done."""
    return _ran_distributed


def cleanup(finished: bool = True) -> None:
    """Leave the process group this module created (no-op otherwise).

    finished: every process got here the normal way, so they wait for each other first (a process
    that left while a peer was still finishing its last collective could make gloo abort that
    peer). After an error, pass False: the others may never arrive, and torchrun stops them.
    """
    global _owns_group
    if _owns_group and dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()
    _owns_group = False
