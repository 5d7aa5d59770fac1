"""Where and how a run computes: the device, its CPU threads and memory allocator, the seeds,
and whether bf16 autocast may run."""

from __future__ import annotations

import ctypes
import math
import os
import random
import time
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
    them yet: torch allows that once) to the plan; `applied_threads` reports it for the run's tag.
    A command's process also keeps its freed memory (`keep_freed_memory`)."""
    global _applied
    keep_freed_memory()
    torch.set_num_threads(plan.threads)
    try:
        torch.set_num_interop_threads(plan.threads)
    except RuntimeError:  # inter-op work already ran in this process: its pool stays as it is
        pass
    _applied = plan
    _other_load.look()  # where the first training pass measures other processes' load from


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
HEAP_UP_TO = 32 << 20  # the largest mmap threshold glibc accepts on a 64-bit machine
KEEP_FREED = 1 << 30
ALLOCATOR_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD")


def keep_freed_memory() -> bool:
    """glibc's malloc, told to serve blocks up to 32 MB (a batch's activations, an evaluation's
    1,000-image batch) from its heap and to keep what is freed there, rather than mapping each
    from the kernel and unmapping it when freed, so that every step faults the same pages in
    again: conv training 5-9% faster, a conv encoder on 1,000 images 1.5-2x (benchmarks/RESULTS.md
    §0r). The process keeps its peak heap, as a caching allocator would. Nothing is changed where
    the environment sets the allocator itself (the variables in ALLOCATOR_SETTINGS) or the C
    library has no mallopt; True when both settings took."""
    if any(os.environ.get(name) for name in ALLOCATOR_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, HEAP_UP_TO)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_FREED))


def share_with(busy_workers: Callable[[], int] | None) -> None:
    """Size this process's threads by `busy_workers()`, the workers on this machine that still
    have trials to train, rather than by all of them: when the others run out of work (a study's
    last, largest batch), `rebalance_threads` gives their CPUs to the ones still training."""
    global _busy_workers
    _busy_workers = busy_workers


FREE_CPU_THRESHOLD = 0.75  # of a CPU that other processes keep busy before a share gives it up


class OtherLoad:
    """How many of this process's CPUs other processes kept busy between two looks: the busy
    time of the CPUs in the affinity mask (/proc/stat) less this process's own (/proc/self/stat).
    Our OpenMP threads' spinning counts as ours, so it never hides another process's load."""

    def __init__(self):
        self.last: tuple[float, int, int] | None = None

    def look(self) -> float | None:
        """Other processes' busy CPUs since the previous look (None at the first, or without /proc)."""
        reading, now = read_cpu_ticks(), time.monotonic()
        if reading is None:
            return None
        busy = None
        if self.last is not None and now > self.last[0]:
            ticks = (now - self.last[0]) * os.sysconf("SC_CLK_TCK")
            busy = max(0.0, ((reading[0] - self.last[1]) - (reading[1] - self.last[2])) / ticks)
        self.last = (now, *reading)
        return busy


def read_cpu_ticks() -> tuple[int, int] | None:
    """(busy clock ticks of the CPUs this process may use, this process's own ticks), or None
    where /proc cannot say."""
    try:
        cpus = os.sched_getaffinity(0)
        lines = Path("/proc/stat").read_text().splitlines()
        own = Path("/proc/self/stat").read_text()
    except (OSError, AttributeError):
        return None
    busy = 0
    for line in lines:
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            ticks = [int(value) for value in values[:8]]  # user nice system idle iowait irq softirq steal
            busy += sum(ticks) - ticks[3] - ticks[4]
    fields = own[own.rindex(")") + 2:].split()  # after the command name: field 3 (state) onwards
    return busy, int(fields[11]) + int(fields[12])  # utime + stime


def threads_for(plan: ThreadPlan, busy_workers: int, external_busy: float) -> int:
    """A share's threads: the plan's CPUs divided by this machine's workers still training, and
    no more than the CPUs that processes outside the command leave free (a CPU counts as taken
    from FREE_CPU_THRESHOLD of it busy), at least one."""
    share = max(1, plan.cpus // max(1, busy_workers))
    return max(1, min(share, math.ceil(plan.cpus - external_busy - (1 - FREE_CPU_THRESHOLD))))


_other_load = OtherLoad()
_external_busy = 0.0  # CPUs kept busy by processes outside this command, as of the pass's start


def fit_threads_to_load() -> None:
    """At the start of a training pass: look at what other processes kept busy since the last
    look (the first is when the plan was applied) and size this pass's threads by it. The count
    then stays for the pass (a thread count changes a run's last digits: torch splits its
    reductions by it), except as this command's own workers run out of trials. Two OpenMP
    threads beside a CPU-bound process on two cores wait, step after step, on the one sharing a
    core with it: 3.1x slower than one thread (benchmarks/RESULTS.md §0l)."""
    global _external_busy
    if _applied is None or not _applied.shared_by:
        return
    other = _other_load.look()
    if other is None:
        return
    busy = _busy_workers() if _busy_workers is not None else 1
    ours = (busy - 1) * max(1, _applied.cpus // busy)  # this command's other workers, at their shares
    _external_busy = max(0.0, other - ours)
    _set_threads(threads_for(_applied, busy, _external_busy))


def rebalance_threads() -> None:
    """Between training steps: take this process's share of the CPUs again, when the plan was
    a share and the number of this command's busy workers changed."""
    if _applied is None or not _applied.shared_by or _busy_workers is None:
        return
    _set_threads(threads_for(_applied, _busy_workers(), _external_busy))  # no syscall on the training path


def _set_threads(threads: int) -> None:
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)


def applied_threads() -> str:
    """What the run's tag records: the plan a command applied, else torch's own count."""
    threads = torch.get_num_threads()
    growing = _applied is not None and _applied.shared_by > 1 and _busy_workers is not None
    if _applied is not None and _applied.shared_by and _external_busy >= FREE_CPU_THRESHOLD and \
            threads < _applied.threads:
        return f"{threads} ({_applied.why}; {_external_busy:.1f} kept busy by other processes)"
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
