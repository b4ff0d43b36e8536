"""Shared pieces of the benchmarks: machine facts, matmul throughput, FLOP counting, call counters,
peak memory, precision settings and result tables.

Every benchmark reports ratios against a baseline measured in the same run (the machine these run
on is shared and noisy), never absolute numbers alone.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

PRECISIONS = ("fp32", "fp32-cl", "bf16", "bf16-all")

# --------------------------------------------------------------------------------------------
# The machine


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where it does not exist)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(threads: int) -> dict[str, Any]:
    """What the numbers depend on: CPU, its bfloat16 units, threads, torch build, current load."""
    flags = cpu_flags()
    return {
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def bf16_hardware_note(info: dict[str, Any]) -> str:
    if info["amx_bf16"]:
        return "AMX bf16 present: bf16 matmuls run on tile units"
    if info["avx512_bf16"]:
        return "AVX-512 BF16 present (no AMX): bf16 gains are modest"
    return "no AVX-512 BF16 / AMX: bf16 is emulated and cannot be much faster than fp32"


def matmul_throughput(dtype: torch.dtype, size: int = 2048, seconds: float = 1.5) -> float:
    """Best observed FLOP/s of a size x size matmul in `dtype` (best-of, so that other processes
    sharing the cores lower it as little as possible)."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b  # warm-up: kernel selection, page faults
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        tick = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - tick)
    return 2 * size**3 / best


def _cpu_flash_attention_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_attention_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args,
                                       out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch's counter knows the CUDA attention kernels only; the fused CPU kernel (what
# scaled_dot_product_attention runs here) would count as zero FLOPs.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flop,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_attention_backward_flop,
}


def count_flops(fn: Callable[[], Any]) -> tuple[Any, int]:
    """(fn(), the FLOPs torch's flop counter attributes to it: 2 per multiply-add of convs,
    matmuls and attention, the CPU's fused attention kernel included; elementwise work is not
    counted, so the bound is optimistic)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        result = fn()
    return result, int(counter.get_total_flops())


# --------------------------------------------------------------------------------------------
# Memory


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM) in MiB; falls back to getrusage's ru_maxrss."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(argv: list[str]) -> dict[str, Any]:
    """Run `python argv...` in a fresh process (so it has its own peak RSS); the JSON of its last line."""
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Counting module calls


@dataclass
class CallStats:
    calls: int = 0
    seconds: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)


@contextmanager
def counting(modules: dict[str, nn.Module]):
    """Count and time every forward call of the named modules (hooks removed on exit)."""
    stats = {name: CallStats() for name in modules}
    started: dict[str, float] = {}
    handles = []
    for name, module in modules.items():
        def pre(_module, args, name=name):
            started[name] = time.perf_counter()
            stats[name].batch_sizes.append(int(args[0].shape[0]) if args and torch.is_tensor(args[0]) else -1)

        def post(_module, _args, _output, name=name):
            stats[name].calls += 1
            stats[name].seconds += time.perf_counter() - started.pop(name)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------------------------
# Models with random weights


def randomize_zero_init(module: nn.Module, std: float = 0.02, seed: int = 0) -> nn.Module:
    """Give zero-initialised parameters (the UNet's output convs) small random values, so a
    random-weight model computes a non-trivial function and precision differences show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            if param.numel() and not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return module


def apply_precision(model: nn.Module, precision: str) -> nn.Module:
    """Convert a MIDM's networks for inference; everything else (sampler arithmetic, matching,
    vector quantisation) stays float32, since the networks take and return float32.

    fp32, fp32-cl and bf16 are `MIDM.set_precision`'s (fp32: as built, the reference, contiguous;
    fp32-cl: channels-last convolutions; bf16: the UNet in bfloat16, first stage float32, both
    channels-last). bf16-all, measured here only: the first stage in bfloat16 as well (faster; its
    rounding reaches the output image directly).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16-all":
        model.set_precision("bf16")
        model.first_stage.to(dtype=torch.bfloat16)
        return model
    return model.set_precision(precision)


# --------------------------------------------------------------------------------------------
# Output


def format_table(rows: Iterable[dict[str, Any]], columns: list[str]) -> str:
    rows = list(rows)

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    table = [[cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in table]
    return "\n".join(lines)


def verdict(name: str, value: float, limit: float, unit: str = "", higher_is_better: bool = False) -> str:
    """One line: whether `value` meets `limit`, and by what factor it misses."""
    met = value >= limit if higher_is_better else value <= limit
    factor = (limit / value if higher_is_better else value / limit) if value and limit else float("inf")
    state = "met" if met else f"MISSED by {factor:.2f}x"
    relation = ">=" if higher_is_better else "<="
    return f"  {name}: {value:.3g}{unit} (target {relation} {limit:g}{unit}) -> {state}"
