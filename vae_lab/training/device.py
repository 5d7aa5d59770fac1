"""Where and how a run computes: the device, its CPU threads, the seeds, and whether bf16
autocast may run."""

from __future__ import annotations

import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from vae_lab.config import ConfigError


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but this machine has no usable CUDA GPU; use device=auto or device=cpu")
    return torch.device(requested)


@dataclass(frozen=True)
class ThreadPlan:
    threads: int
    why: str
    shared_by: int = 0  # the workers whose equal shares of the CPUs these are; 0: a count the user set
    cpus: int = 0  # the CPUs shared (for a share)

    def __str__(self) -> str:
        return f"{self.threads} ({self.why})"


def usable_cpus() -> tuple[int, str]:
    """How many CPUs this process may run on, and what says so: the affinity mask (what taskset,
    cgroups' cpusets and Slurm's task binding set), lowered to $SLURM_CPUS_PER_TASK in a Slurm job."""
    try:
        cpus, source = len(os.sched_getaffinity(0)), "the CPU affinity mask"
    except AttributeError:  # not Linux
        cpus, source = os.cpu_count() or 1, "os.cpu_count()"
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and 0 < int(slurm) < cpus:
        cpus, source = int(slurm), "SLURM_CPUS_PER_TASK"
    return cpus, source


def plan_threads(requested: int = 0, workers: int = 1) -> ThreadPlan:
    """torch's intra-op threads for one of `workers` processes on this machine: `requested` (the
    config's `threads`) if set, else $OMP_NUM_THREADS if set, else an equal share of the usable
    CPUs, at least one. Every process taking every core makes two workers on two cores run four
    spinning OpenMP threads: measured 1.9x slower than one worker (benchmarks/RESULTS.md §0j)."""
    if requested > 0:
        return ThreadPlan(requested, "threads")
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return ThreadPlan(int(omp), "OMP_NUM_THREADS")
    cpus, source = usable_cpus()
    share = max(1, cpus // max(1, workers))
    return ThreadPlan(share, f"{cpus} CPUs by {source}" + (f" / {workers} workers" if workers > 1 else ""),
                      shared_by=max(1, workers), cpus=cpus)


_applied: ThreadPlan | None = None
_busy_workers: Callable[[], int] | None = None  # how many of this machine's workers still train


def apply_threads(plan: ThreadPlan) -> None:
    """Set torch's intra-op threads (and its inter-op threads, where this process has not used
    them yet: torch allows that once) to the plan; `applied_threads` reports it for the run's tag."""
    global _applied
    torch.set_num_threads(plan.threads)
    try:
        torch.set_num_interop_threads(plan.threads)
    except RuntimeError:  # inter-op work already ran in this process: its pool stays as it is
        pass
    _applied = plan


def share_with(busy_workers: Callable[[], int] | None) -> None:
    """Size this process's threads by `busy_workers()`, the workers on this machine that still
    have trials to train, rather than by all of them: when the others run out of work (a study's
    last, largest batch), `rebalance_threads` gives their CPUs to the ones still training."""
    global _busy_workers
    _busy_workers = busy_workers


def rebalance_threads() -> None:
    """Between training steps: take this process's share of the CPUs again, when the plan was
    a share and the number of busy workers changed."""
    if _applied is None or not _applied.shared_by or _busy_workers is None:
        return
    threads = max(1, _applied.cpus // max(1, _busy_workers()))  # no syscall on the training path
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)


def applied_threads() -> str:
    """What the run's tag records: the plan a command applied, else torch's own count."""
    threads = torch.get_num_threads()
    growing = _applied is not None and _applied.shared_by > 1 and _busy_workers is not None
    if _applied is not None and _applied.threads == threads:
        return f"{_applied}; more as the other workers run out of trials" if growing else str(_applied)
    if growing:
        return f"{threads} ({_applied.why}, shared by the {_busy_workers()} still training)"
    return f"{threads} (torch's setting in this process)"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


_warned_amp: set[str] = set()


def cpu_has_native_bf16() -> bool | None:
    """True/False from the CPU's flags (AVX-512 BF16, AMX, Arm BF16); None when unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    if not flags:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def effective_amp(requested: bool, device: torch.device) -> bool:
    """`train.amp` as it will run. On a CPU without native bf16, autocast emulates bf16 and an
    epoch was measured 7.8x slower (AVX2, 784-400-20 VAE): fall back to fp32 with a warning."""
    if not requested:
        return False
    if device.type == "cpu" and cpu_has_native_bf16() is False:
        if "cpu" not in _warned_amp:
            _warned_amp.add("cpu")
            warnings.warn("train.amp=true ignored: this CPU has no native bf16 (no avx512_bf16/amx_bf16), "
                          "where bf16 autocast was measured 7.8x slower than fp32; training in fp32",
                          RuntimeWarning, stacklevel=2)
        return False
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:  # bf16 is emulated before Ampere
        if "cuda" not in _warned_amp:
            _warned_amp.add("cuda")
            warnings.warn("train.amp=true ignored: this GPU has no bf16; training in fp32",
                          RuntimeWarning, stacklevel=2)
        return False
    return True
