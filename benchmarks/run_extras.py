"""What the optional records cost a default run: latents/evolution.gif and MLflow's system metrics.

    python benchmarks/run_extras.py [--repeats 2] [overrides ...]

Runs `python -m vae_lab.train` (the default run: 784-400-20 MLP VAE, mnist5k, 10 epochs) as a
whole process, each into a fresh SQLite store, in rounds that alternate the variants so drift on
a shared machine hits each alike:
- baseline: tracking.latent_frames_every=0 tracking.system_metrics_every=0
- frames:   tracking.latent_frames_every=10 (the default)
- system:   tracking.system_metrics_every=5 (what studies use)
Prints each variant's best and median wall seconds and its ratio to the baseline.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine_line

import torch

VARIANTS = {
    "baseline": ["tracking.latent_frames_every=0", "tracking.system_metrics_every=0"],
    "frames": ["tracking.latent_frames_every=10", "tracking.system_metrics_every=0"],
    "system": ["tracking.latent_frames_every=0", "tracking.system_metrics_every=5"],
}


def one_run(overrides: list[str]) -> float:
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "vae_lab.train", "train.progress=false",
                   f"tracking.uri=sqlite:///{Path(folder) / 'mlflow.db'}", *overrides]
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
        return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="extra overrides for every run")
    args = parser.parse_args()
    print(machine_line(torch.device("cpu")))
    seconds = {name: [] for name in VARIANTS}
    for round_number in range(args.repeats):
        for name, overrides in VARIANTS.items():
            seconds[name].append(one_run([*overrides, *args.overrides]))
            print(f"round {round_number + 1}: {name:9s} {seconds[name][-1]:6.2f} s", flush=True)
    base = min(seconds["baseline"])
    print(f"\n{'variant':9s} {'best s':>7s} {'median s':>9s} {'best vs baseline':>17s}")
    for name, values in seconds.items():
        print(f"{name:9s} {min(values):7.2f} {statistics.median(values):9.2f} {min(values) / base:16.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
