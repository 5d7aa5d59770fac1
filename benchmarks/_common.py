"""Helpers the benchmark scripts share: the machine they ran on, a throwaway MLflow store.

Importing it puts this checkout's root first on the import path (and on PYTHONPATH for the
processes a benchmark starts), so a benchmark run from another checkout (a git worktree of the
landed code, for before/after figures) measures that checkout's vae_lab, not the one the
virtual environment has installed in editable mode."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import tempfile
from pathlib import Path

CHECKOUT = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, CHECKOUT)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [CHECKOUT, os.environ.get("PYTHONPATH", "")]))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402


def set_threads(threads: int) -> None:
    """0 keeps torch's default (one per core)."""
    if threads > 0:
        torch.set_num_threads(threads)


def machine_line(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    load = "/".join(f"{value:.1f}" for value in os.getloadavg())
    return (f"device {device} ({where}); {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads; load average {load} (1/5/15 min)")


@contextlib.contextmanager
def temporary_store():
    """An absolute SQLite MLflow URI in a temporary folder, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="vae_lab_bench_") as folder:
        yield f"sqlite:///{Path(folder) / 'mlflow.db'}"


def ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}x"
