"""Latency, work and memory of one translation (Algorithm 1 + refinement + decode) on CPU.

Run: python benchmarks/bench_translate.py --preset tiny            (seconds)
     python benchmarks/bench_translate.py --preset paper-celebahq  (minutes: 24 calls of a 274M-param UNet)
Options: --precisions fp32,fp32-cl,bf16,bf16-all  --threads 2  --batch 1  --repeat N  --json FILE

Random weights (zero-initialised output layers given small random values), official sampler
settings, batch 1. Each precision runs in a fresh subprocess, so its peak RSS (VmHWM) is that of
one whole translation: model construction, inputs, warm-up, the run. Printed per precision:
wall time, UNet calls / encodes / decodes counted with forward hooks, the FLOPs of the run
(torch's FlopCounterMode, a separate untimed pass), the fp32 and bf16 matmul throughput measured
in the same process, the resulting efficiency time / (FLOPs / matmul throughput), and ratios
against two baselines of the same run: the fp32 reference path, and the official code's cost
(29 UNet calls, 2 encodes, 7 decodes, counted in its sampling code) emulated from the
per-call times just measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    PRECISIONS,
    apply_precision,
    bf16_hardware_note,
    count_flops,
    counting,
    format_table,
    machine_info,
    matmul_throughput,
    peak_rss_mb,
    randomize_zero_init,
    run_child,
    verdict,
)

# The official code's work per image, against which ours is compared.
OFFICIAL_UNET_CALLS, OFFICIAL_ENCODES, OFFICIAL_DECODES = 29, 2, 7
# Targets of issue #9 (CPU, 2 threads, paper-celebahq unless noted).
TARGET_UNET_CALLS, TARGET_ENCODES, TARGET_DECODES = 24, 1, 1
TARGET_RSS_MB = 2048
# The user's path (`--cli`): 2.0 GB for fp32, 1.2 GB for bf16 (decimal GB, in MiB).
CLI_TARGET_RSS_MB = {"fp32": 2.0e9 / 2**20, "bf16": 1.2e9 / 2**20}
TARGET_FP32_EFFICIENCY = 1.4
TARGET_BF16_SPEED = 0.25
TARGET_BF16_MAE_255 = 1.0


def build_inputs(config, batch: int, seed: int):
    """(conditions (B, nc, H, W) in {0, 1}, one exemplar (1, 3, H, W) in [−1, 1], its condition)."""
    generator = torch.Generator().manual_seed(seed)
    size, channels = config.image_size, config.correspondence.cond_channels
    condition = (torch.rand(batch, channels, size, size, generator=generator) > 0.9).float()
    exemplar = torch.rand(1, 3, size, size, generator=generator) * 2 - 1
    exemplar_condition = (torch.rand(1, channels, size, size, generator=generator) > 0.9).float()
    return condition, exemplar, exemplar_condition


def child(args: argparse.Namespace) -> dict:
    """One precision in this process: build, warm up, count FLOPs, time, report."""
    from midms_cli.models.midm import MIDM
    from midms_cli.presets import preset
    from midms_cli.sampler import translate

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = apply_precision(randomize_zero_init(MIDM(preset(args.preset)).eval()), args.precision)
    condition, exemplar, exemplar_condition = build_inputs(model.config, args.batch, seed=1)

    def run():
        generator = torch.Generator().manual_seed(0)
        return translate(model, condition, exemplar, exemplar_condition, generator=generator).image

    # Everything below runs under no_grad (as translate itself does), not inference_mode: torch's
    # flop counter cannot see parametrized spectral-norm convs under inference_mode.
    with torch.no_grad():
        # Warm-up at the working shapes (oneDNN primitive creation, first-touch allocations), which
        # also counts the FLOPs of one call of each network.
        latent, encode_flops = count_flops(lambda: model.encode(exemplar))
        batch_latent = latent.expand(args.batch, -1, -1, -1)
        _, unet_flops = count_flops(lambda: model.eps(model.unet, batch_latent, 249))
        _, decode_flops = count_flops(lambda: model.decode(batch_latent))
        if args.repeat > 1:
            run()
        throughput = {"fp32": matmul_throughput(torch.float32), "bf16": matmul_throughput(torch.bfloat16)}
        first_stage = model.first_stage
        parts = {"unet": model.unet, "encoder": first_stage.encoder, "decoder": first_stage.decoder}
        best = None
        for _ in range(args.repeat):
            with counting(parts) as stats:
                start = time.perf_counter()
                image = run()
                elapsed = time.perf_counter() - start
            if best is None or elapsed < best[0]:
                best = (elapsed, stats)
        elapsed, stats = best
        # Matmul throughput again after the run; the best of both is the machine's.
        throughput = {k: max(v, matmul_throughput(torch.bfloat16 if k == "bf16" else torch.float32))
                      for k, v in throughput.items()}
        # FLOPs in a separate, untimed pass: the counter's per-op dispatch would show in the time.
        _, flops = count_flops(run)
    save_file({"image": image.float().contiguous()}, args.image_out)  # for the parent's comparison
    # FLOP bound: each network's share at the throughput of the dtype it runs in, the rest (matching,
    # correspondence networks) at float32.
    unet_dtype = "bf16" if args.precision.startswith("bf16") else "fp32"
    first_stage_dtype = "bf16" if args.precision == "bf16-all" else "fp32"
    unet_total = unet_flops * stats["unet"].calls
    first_stage_total = encode_flops * stats["encoder"].calls + decode_flops * stats["decoder"].calls
    bound = (unet_total / throughput[unet_dtype] + first_stage_total / throughput[first_stage_dtype]
             + max(flops - unet_total - first_stage_total, 0) / throughput["fp32"])
    return {
        "precision": args.precision,
        "seconds": elapsed,
        "unet_calls": stats["unet"].calls,
        "encodes": stats["encoder"].calls,
        "decodes": stats["decoder"].calls,
        "unet_seconds": stats["unet"].seconds,
        "encode_seconds": stats["encoder"].seconds,
        "decode_seconds": stats["decoder"].seconds,
        "flops": flops,
        "matmul_fp32_gflops": throughput["fp32"] / 1e9,
        "matmul_bf16_gflops": throughput["bf16"] / 1e9,
        "unet_flops": unet_total,
        "first_stage_flops": first_stage_total,
        "flop_bound_seconds": bound,
        "efficiency": elapsed / bound,
        "peak_rss_mb": peak_rss_mb(),
    }


def official_emulated(result: dict) -> float:
    """The official code's time for the same image: ours plus the extra UNet calls, encodes and
    decodes it makes, each priced at its mean measured time in this run."""
    per_unet = result["unet_seconds"] / max(result["unet_calls"], 1)
    per_encode = result["encode_seconds"] / max(result["encodes"], 1)
    per_decode = result["decode_seconds"] / max(result["decodes"], 1)
    return (result["seconds"] + (OFFICIAL_UNET_CALLS - result["unet_calls"]) * per_unet
            + (OFFICIAL_ENCODES - result["encodes"]) * per_encode
            + (OFFICIAL_DECODES - result["decodes"]) * per_decode)


def write_random_model(preset_name: str, path: Path) -> None:
    """A random-weight float32 model file of a preset (zero-initialised layers randomised too)."""
    from midms_cli.models.midm import MIDM
    from midms_cli.pipelines.translate import save_midm
    from midms_cli.presets import preset

    torch.manual_seed(0)
    save_midm(path, randomize_zero_init(MIDM(preset(preset_name)).eval()))


def cli_run(args: argparse.Namespace, precisions: list[str]) -> list[dict]:
    """The user's path: a model file (`--model`, or a random-weight float32 one of the preset), then
    run `midms translate --precision P` on one condition/exemplar pair in a subprocess per
    precision; wall time (CLI start-up, loading, translation, writing) and that child's own peak
    RSS (wait4's rusage)."""
    import subprocess

    from midms_cli.checkpoint import read_metadata
    from midms_cli.conditions.io import save_condition
    from midms_cli.config import ModelConfig
    from midms_cli.images import save_png

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model_file = Path(args.model) if args.model else folder / "model.safetensors"
        if not args.model:
            # Written by a process of its own: a child forked from a process that held the model
            # would inherit its resident set in the peak the kernel reports for the child.
            writer = [sys.executable, __file__, "--preset", args.preset, "--write-model", str(model_file)]
            subprocess.run(writer, check=True)
        config = ModelConfig.from_dict(read_metadata(model_file)["config"])
        condition, exemplar, exemplar_condition = build_inputs(config, 1, seed=1)
        save_condition(condition[0], folder / "cond.npy")
        save_png(exemplar[0], folder / "ref.png")
        save_condition(exemplar_condition[0], folder / "ref_cond.npy")
        file_mb = model_file.stat().st_size / 2**20
        for precision in precisions:
            command = [sys.executable, "-m", "midms_cli", "translate", str(folder / "cond.npy"),
                       str(folder / "ref.png"), "--ref-cond", str(folder / "ref_cond.npy"),
                       "-o", str(folder / f"out-{precision}.png"), "--model", str(model_file),
                       "--precision", precision, *args.cli_args.split()]
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            start = time.perf_counter()
            proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                    env=env)
            stderr = proc.stderr.read()
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            elapsed = time.perf_counter() - start
            if proc.returncode != 0:
                raise RuntimeError(f"midms translate failed:\n{stderr[-2000:]}")
            results.append({"precision": precision, "seconds": elapsed, "peak_rss_mb": usage.ru_maxrss / 1024,
                            "model_file_mb": file_mb, "target_mb": CLI_TARGET_RSS_MB.get(precision),
                            "command": "midms translate COND REF --ref-cond C --model FILE --precision "
                                       f"{precision} {args.cli_args}".strip()})
    return results


def paired_run(args: argparse.Namespace, precisions: list[str]) -> list[dict]:
    """All precisions in one process, timed alternately for `--rounds` rounds (best kept): the ratios
    between precisions then share the machine's load, unlike runs in separate processes."""
    from midms_cli.models.midm import MIDM
    from midms_cli.presets import preset
    from midms_cli.sampler import translate

    torch.set_num_threads(args.threads)
    models = {}
    for precision in precisions:
        torch.manual_seed(0)  # identical weights in every copy
        models[precision] = apply_precision(randomize_zero_init(MIDM(preset(args.preset)).eval()), precision)
    condition, exemplar, exemplar_condition = build_inputs(models[precisions[0]].config, args.batch, seed=1)
    best: dict[str, dict] = {}
    with torch.no_grad():
        for model in models.values():  # warm-up
            model.decode(model.eps(model.unet, model.encode(exemplar), 249))
        for _ in range(args.rounds):
            for precision, model in models.items():
                with counting({"unet": model.unet}) as stats:
                    start = time.perf_counter()
                    image = translate(model, condition, exemplar, exemplar_condition,
                                      generator=torch.Generator().manual_seed(0)).image
                    elapsed = time.perf_counter() - start
                if precision not in best or elapsed < best[precision]["seconds"]:
                    best[precision] = {"precision": precision, "seconds": elapsed, "image": image,
                                       "unet_seconds_per_call": stats["unet"].seconds / stats["unet"].calls}
    reference = best[precisions[0]]
    for result in best.values():
        result["vs_first"] = result["seconds"] / reference["seconds"]
        result["unet_call_vs_first"] = result["unet_seconds_per_call"] / reference["unet_seconds_per_call"]
        result["mae_255_vs_first"] = float((result["image"] - reference["image"]).abs().mean() * 127.5)
    for result in best.values():
        del result["image"]
    return [best[p] for p in precisions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--precisions", default="fp32,bf16", help=f"comma list of {', '.join(PRECISIONS)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1, help="conditions sharing one exemplar")
    parser.add_argument("--repeat", type=int, default=0, help="timed runs, best kept (tiny: 3, else 1)")
    parser.add_argument("--json", default=None, help="also write the results as JSON to this file")
    parser.add_argument("--cli", action="store_true",
                        help="instead: run `midms translate --precision P` from a model file per precision "
                             "and report its peak RSS")
    parser.add_argument("--model", default=None,
                        help="with --cli: this model file instead of a random-weight one of the preset")
    parser.add_argument("--cli-args", default="", help="extra arguments for `midms translate` with --cli")
    parser.add_argument("--paired", action="store_true",
                        help="instead: time all precisions alternately in one process (robust ratios)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of --paired (best kept)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--image-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--write-model", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_model:
        write_random_model(args.preset, Path(args.write_model))
        return
    if args.repeat <= 0:
        args.repeat = 3 if args.preset == "tiny" else 1
    if args.child:
        print(json.dumps(child(args)))
        return

    info = machine_info(args.threads)
    if args.cli:
        precisions = [p for p in args.precisions.split(",") if p]
        results = cli_run(args, precisions)
        print(f"preset {args.preset}: `midms translate` from a model file of "
              f"{results[0]['model_file_mb']:.0f} MiB, load avg {os.getloadavg()[0]:.1f} after")
        print(format_table(results, ["precision", "seconds", "peak_rss_mb", "target_mb"]))
        print("(seconds: CLI start-up, loading, translation and writing, under the load printed)")
        for result in results:
            if result["target_mb"]:
                print(verdict(f"peak RSS of the whole CLI translation ({result['precision']})",
                              result["peak_rss_mb"], result["target_mb"], " MiB"))
        if args.json:
            report = {"machine": info, "preset": args.preset, "cli": results}
            Path(args.json).write_text(json.dumps(report, indent=2))
        return
    precisions = [p for p in args.precisions.split(",") if p]
    if args.paired:
        print(f"machine: {info['cpu']}, {info['threads']} threads, {bf16_hardware_note(info)}; "
              f"load avg {info['load_average_1min']:.1f}")
        print(f"preset {args.preset}: precisions timed alternately in one process, "
              f"best of {args.rounds} rounds\n")
        results = paired_run(args, precisions)
        print(format_table(results, ["precision", "seconds", "unet_seconds_per_call", "vs_first",
                                     "unet_call_vs_first", "mae_255_vs_first"]))
        for result in results[1:]:
            if result["precision"].startswith("bf16"):
                print(verdict(f"{result['precision']} time / {precisions[0]} time", result["vs_first"],
                              TARGET_BF16_SPEED, "x"))
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": info, "preset": args.preset, "paired": results},
                                                  indent=2))
        return
    print(f"machine: {info['cpu']}, {info['threads']} threads of {info['logical_cpus']}, "
          f"torch {info['torch']} ({info['cpu_capability']}); {bf16_hardware_note(info)}; "
          f"load avg {info['load_average_1min']:.1f}")
    print(f"preset {args.preset}, batch {args.batch}, official sampler settings, random weights, "
          f"best of {args.repeat} timed run(s)\n")
    results, images = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in precisions:
            image_file = os.path.join(tmp, f"{precision}.safetensors")
            result = run_child([__file__, "--child", "--preset", args.preset, "--precision", precision,
                                "--threads", str(args.threads), "--batch", str(args.batch),
                                "--repeat", str(args.repeat), "--image-out", image_file])
            images[precision] = load_file(image_file)["image"]
            results.append(result)
    reference = results[0]
    for result in results:
        result["vs_first"] = result["seconds"] / reference["seconds"]
        result["official_emulated_seconds"] = official_emulated(result)
        result["speedup_vs_official"] = result["official_emulated_seconds"] / result["seconds"]
        # Mean absolute difference of the output images from the first precision, in 0..255 units.
        result["mae_255_vs_first"] = float((images[result["precision"]] - images[reference["precision"]])
                                           .abs().mean() * 127.5)
        result["gflop"] = result["flops"] / 1e9

    columns = ["precision", "seconds", "unet_calls", "encodes", "decodes", "gflop", "flop_bound_seconds",
               "efficiency", "peak_rss_mb", "vs_first", "official_emulated_seconds", "speedup_vs_official",
               "mae_255_vs_first"]
    print(format_table(results, columns))
    fp32_peak = max(r["matmul_fp32_gflops"] for r in results)
    bf16_peak = max(r["matmul_bf16_gflops"] for r in results)
    first = reference["precision"]
    print(f"\nmatmul throughput (same processes): fp32 {fp32_peak:.0f} GFLOP/s, bf16 {bf16_peak:.0f} GFLOP/s")
    print("efficiency = seconds / FLOP bound (each network's FLOPs / matmul throughput of its dtype)")
    print(f"vs_first = seconds / {first} seconds; mae_255 = mean |image - {first} image| in 0..255")

    print("\ntargets (issue #9):")
    per_image = args.batch
    for result in results:
        p = result["precision"]
        print(f" [{p}]")
        print(verdict("UNet calls per image", result["unet_calls"] / per_image, TARGET_UNET_CALLS))
        print(verdict("encodes per exemplar", result["encodes"], TARGET_ENCODES))
        print(verdict("decodes per batch", result["decodes"], TARGET_DECODES))
        print(verdict("peak RSS", result["peak_rss_mb"], TARGET_RSS_MB, " MiB"))
        if p.startswith("fp32"):
            print(verdict("time / FLOP bound", result["efficiency"], TARGET_FP32_EFFICIENCY, "x"))
        if p.startswith("bf16") and reference["precision"] == "fp32":
            print(verdict("bf16 time / fp32 time", result["vs_first"], TARGET_BF16_SPEED, "x"))
            print(verdict("bf16 output MAE vs fp32", result["mae_255_vs_first"], TARGET_BF16_MAE_255, "/255"))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "preset": args.preset, "batch": args.batch,
                                               "results": results}, indent=2))


if __name__ == "__main__":
    main()
