"""One run quiet and beside a CPU-bound process (issue 22 part 1: within 2x, not 100x).

    python benchmarks/beside_load.py [--data mnist5k] [--batch 16] [--epochs 3] [--busy 1]

Whole `python -m vae_lab.train` processes (tracking off), each training on its own thread plan
(threads=0: its share of the CPUs, fewer while other processes keep them busy), then with
`threads=1` for comparison; each first quiet, then beside `--busy` processes spinning
`while 1: pass`. Prints the last epoch's images/s and the slowdown. Figures:
benchmarks/RESULTS.md §0l.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

from _common import machine_line

import torch  # noqa: E402

SPIN = [sys.executable, "-c", "while 1: pass"]


def images_per_second(overrides: list[str]) -> float:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("OMP_NUM_THREADS", None)
    output = subprocess.run([sys.executable, "-m", "vae_lab.train", *overrides], env=env, capture_output=True,
                            text=True, check=True).stdout
    rates = re.findall(r"([\d,]+) img/s", output)
    if not rates:
        raise SystemExit(f"no img/s in the run's output:\n{output}")
    return float(rates[-1].replace(",", ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="mnist5k")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--busy", type=int, default=1)
    args = parser.parse_args(argv)
    print(machine_line(torch.device("cpu")))
    common = [f"data.name={args.data}", f"train.batch_size={args.batch}", f"train.epochs={args.epochs}",
              "tracking.enabled=false", "eval.enabled=false", "train.progress=true", "device=cpu"]
    print(f"{args.data}, batch {args.batch}, {args.epochs} epochs; last epoch's images/s")
    print(f"{'threads':28s} {'quiet':>9s} {f'beside {args.busy} busy':>15s}  slowdown")
    for label, threads in (("0 (the plan: share, less load)", 0), ("1", 1)):
        overrides = [*common, f"threads={threads}"]
        quiet = images_per_second(overrides)
        spinners = [subprocess.Popen(SPIN) for _ in range(args.busy)]
        try:
            loaded = images_per_second(overrides)
        finally:
            for spinner in spinners:
                spinner.kill()
                spinner.wait()
        print(f"{label:28s} {quiet:9.0f} {loaded:15.0f}  {quiet / loaded:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
