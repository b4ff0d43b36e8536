"""Start-up time of the command-line tool: `midms --help` and `midms translate --help`.

Run: python benchmarks/bench_startup.py [--repeat 10] [--json FILE]

Each command runs in a fresh process (`python -m midms_cli ...`), alternating with the baseline
`python -c pass` of the same interpreter, so machine load affects both alike. Printed: the
median wall time of each, the median of the overhead (command minus baseline) and the ratio
command / baseline; the target is `midms --help` in under 0.5 s, overhead included. Also printed:
whether the command's process imported torch (it should not, for help). Last, what a translation
imports before it starts (its command module and pipeline) against `python -c "import torch"`, which
a translation cannot avoid.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "midms --help": [sys.executable, "-m", "midms_cli", "--help"],
    "midms translate --help": [sys.executable, "-m", "midms_cli", "translate", "--help"],
}
BASELINE = [sys.executable, "-c", "pass"]
TRANSLATE_IMPORTS = [
    sys.executable, "-c",
    "from midms_cli.cli.lazy import load_command; load_command('translate');"
    " import midms_cli.pipelines.translate",
]
TORCH = [sys.executable, "-c", "import torch"]
TARGET_SECONDS = 0.5  # `midms --help`


def wall_time(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def imports_torch(argv: list[str]) -> bool:
    """Whether the command, run in this interpreter, leaves torch in sys.modules."""
    script = (
        "import sys\nfrom midms_cli.cli.app import main\n"
        f"try:\n    main({argv[3:]!r})\nexcept SystemExit:\n    pass\n"
        "sys.stderr.write(str('torch' in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    return result.stderr.strip().endswith("True")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    wall_time(BASELINE)  # warm the file cache for both
    for argv in COMMANDS.values():
        wall_time(argv)
    times: dict[str, list[float]] = {"python -c pass": [], **{name: [] for name in COMMANDS}}
    for _ in range(args.repeat):
        for name, argv in COMMANDS.items():
            times["python -c pass"].append(wall_time(BASELINE))
            times[name].append(wall_time(argv))
    baseline = statistics.median(times["python -c pass"])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {load}, {args.repeat} runs")
    print(f"{'command':<24} {'median s':>9} {'overhead s':>11} {'x baseline':>11}  imports torch")
    print(f"{'python -c pass':<24} {baseline:>9.3f} {'':>11} {1.0:>11.1f}")
    results = {"baseline_seconds": baseline, "load_average_1min": load, "commands": {}}
    for name, argv in COMMANDS.items():
        median = statistics.median(times[name])
        torch_loaded = imports_torch(argv)
        results["commands"][name] = {
            "seconds": median, "ratio": median / baseline, "imports_torch": torch_loaded
        }
        overhead, ratio = median - baseline, median / baseline
        print(f"{name:<24} {median:>9.3f} {overhead:>11.3f} {ratio:>11.1f}  {torch_loaded}")
    torch_times, translate_times = [], []
    for _ in range(args.repeat):
        torch_times.append(wall_time(TORCH))
        translate_times.append(wall_time(TRANSLATE_IMPORTS))
    torch_seconds, translate_seconds = statistics.median(torch_times), statistics.median(translate_times)
    results["translate_imports"] = {"seconds": translate_seconds, "import_torch_seconds": torch_seconds}
    print(f"{'import torch':<24} {torch_seconds:>9.3f}")
    print(f"{'translate imports':<24} {translate_seconds:>9.3f} {translate_seconds - torch_seconds:>11.3f} "
          f"{translate_seconds / torch_seconds:>11.2f}  (overhead and ratio vs import torch)")
    help_seconds = results["commands"]["midms --help"]["seconds"]
    verdict = "meets" if help_seconds < TARGET_SECONDS else "misses"
    print(f"`midms --help` {help_seconds:.3f} s {verdict} the {TARGET_SECONDS} s target")
    if args.json_path:
        with open(args.json_path, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
