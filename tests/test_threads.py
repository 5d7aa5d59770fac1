"""Each process takes its share of the CPUs it may use (issue 22, part 1): the affinity mask or
Slurm's CPUs per task, divided among this machine's --workers still training; `threads` or
OMP_NUM_THREADS override it; the run records what ran. Several workers take a grid's costliest
batch first."""

import dataclasses
import os
import subprocess
import time

import torch
from mlflow.tracking import MlflowClient

from conftest import TINY_RUN
from test_sweep import PYTHON, subprocess_env, write_study
from vae_lab import names
from vae_lab.config import build_config
from vae_lab.study.claims import ask_trials
from vae_lab.study.runner import open_session, start_worker
from vae_lab.study.session import SweepSettings
from vae_lab.study.spec import load_study_spec
from vae_lab.study.storage import assignment_of
from vae_lab.training.batching import plan_batches, stacking_pays
from vae_lab.training import device
from vae_lab.training.device import (
    ThreadPlan,
    apply_threads,
    plan_threads,
    rebalance_threads,
    share_with,
    threads_for,
    usable_cpus,
)


def test_the_share_follows_the_affinity_mask_slurm_and_the_workers(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    cpus = len(os.sched_getaffinity(0))
    assert usable_cpus() == (cpus, "the CPU affinity mask")
    assert plan_threads().threads == cpus
    assert plan_threads(workers=2).threads == max(1, cpus // 2)
    assert plan_threads(workers=cpus + 5).threads == 1  # never none
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert plan_threads().threads == 1 and "SLURM_CPUS_PER_TASK" in plan_threads().why
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert (plan_threads().threads, plan_threads().why) == (3, "OMP_NUM_THREADS")
    assert (plan_threads(requested=5).threads, plan_threads(requested=5).why) == (5, "threads")


def test_a_run_pinned_to_one_cpu_takes_one_thread_and_says_so(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = subprocess_env(uri)
    env.pop("OMP_NUM_THREADS", None)
    result = subprocess.run(["taskset", "-c", "0", PYTHON, "-m", "vae_lab.train", *TINY_RUN, f"tracking.uri={uri}",
                             "train.epochs=1", "eval.enabled=false", "tracking.log_model=false",
                             "tracking.log_images=false"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    run = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("vae_lab").experiment_id])[0]
    assert run.data.tags[names.THREADS_TAG] == "1 (1 CPUs by the CPU affinity mask)"


def test_a_negative_thread_count_is_one_line(tmp_path):
    result = subprocess.run([PYTHON, "-m", "vae_lab.train", "threads=-1"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120, env=subprocess_env(f"sqlite:///{tmp_path}/m.db"))
    assert result.returncode == 2
    assert result.stderr.strip() == "error: threads must be zero or positive, got -1"
    assert not (tmp_path / "m.db").exists()


def test_a_worker_takes_the_cpus_of_the_workers_that_ran_out_of_trials(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setattr(device, "_applied", None)
    monkeypatch.setattr(device, "_external_busy", 0.0)  # no other process's load in this test
    cpus, before = usable_cpus()[0], torch.get_num_threads()
    busy = [1, 1]  # what workers.Helpers shares between processes: a flag per worker
    try:
        apply_threads(plan_threads(workers=2))
        share_with(lambda: sum(busy))
        rebalance_threads()
        assert torch.get_num_threads() == max(1, cpus // 2)
        assert device.applied_threads().endswith("; more as the other workers run out of trials")
        busy[1] = 0  # the other worker has nothing left to train
        rebalance_threads()
        assert torch.get_num_threads() == cpus
        assert "shared by the 1 still training" in device.applied_threads()
        apply_threads(plan_threads(requested=1))  # a count the user set is kept
        rebalance_threads()
        assert torch.get_num_threads() == 1
    finally:
        share_with(None)
        torch.set_num_threads(before)


def test_workers_sharing_a_machine_take_the_costliest_batch_first(tmp_path):
    """On the CPU the conv VAE trains one by one (stacking_pays) and costs the most: workers
    sharing a machine take its trials one at a time, first; the AEs go as one batch."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = write_study(tmp_path / "lpt.yaml", "lpt", {"model.name": ["ae", "conv_vae"], "seeds": [0, 1]},
                       device="cpu")
    spec = load_study_spec(path, [])
    settings = SweepSettings(spec=spec, tracking_uri=uri, storage_url=f"journal:///{tmp_path / 'optuna.journal'}",
                             progress=False, workers_here=2)
    session = open_session(settings)
    first, second = start_worker(session), start_worker(session)

    def models(trials):
        return [assignment_of(trial)["model.name"] for trial in trials]
    # the grid lists the AE first; the conv batch costs more to train, so it goes first
    assert models(ask_trials(first, count=16)) == ["conv_vae"]
    assert models(ask_trials(second, count=16)) == ["conv_vae"]
    assert models(ask_trials(first, count=16)) == ["ae", "ae"]
    assert ask_trials(second, count=16) == []
    alone = SweepSettings(**{**vars(settings), "workers_here": 1, "new_study": True})
    assert models(ask_trials(start_worker(open_session(alone)), count=16)) == ["ae", "ae"]  # grid order


def test_convolutions_train_one_by_one_on_the_cpu_and_mlps_stacked():
    conv, mlp = (build_config(None, [*TINY_RUN, "device=cpu", f"model.name={name}", f"train.seed={seed}"])
                 for name, seed in (("conv_vae", 0), ("linear_vae", 0)))
    assert not stacking_pays(conv) and stacking_pays(mlp)
    seeds = [dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed))
             for config in (conv, mlp) for seed in (0, 1, 2)]
    assert plan_batches(seeds, "auto") == [[0], [1], [2], [3, 4, 5]]
    assert plan_batches(seeds, 3) == [[0, 1, 2], [3, 4, 5]]  # a cap the study sets is kept


def test_a_share_gives_up_the_cpus_other_processes_keep_busy():
    plan = ThreadPlan(4, "4 CPUs by the CPU affinity mask", shared_by=1, cpus=4)
    assert threads_for(plan, 1, 0.0) == 4
    assert threads_for(plan, 1, 0.7) == 4  # a light load (a test polling a store) takes nothing
    assert threads_for(plan, 1, 1.0) == 3  # a CPU-bound process takes a CPU
    assert threads_for(plan, 1, 2.9) == 1 and threads_for(plan, 1, 9.0) == 1  # never none
    assert threads_for(plan, 2, 1.0) == 2  # two workers: each its share, and what is free caps it
    assert threads_for(plan, 2, 2.0) == 2 and threads_for(plan, 2, 3.0) == 1


def test_other_processes_load_is_measured_without_our_own(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    before = torch.get_num_threads()
    load = device.OtherLoad()
    assert load.look() is None  # the first look only sets where the next one measures from
    spinner = subprocess.Popen([PYTHON, "-c", "while 1: pass"])
    try:
        time.sleep(1.0)
        busy = load.look()
        assert busy is not None and busy >= 0.5  # the spinner, about one whole CPU
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:  # our own work is not another process's
            sum(range(10_000))
        assert load.look() >= 0.5
        # a lone share beside the spinner gives up the CPU it takes, and its tag says why
        monkeypatch.setattr(device, "_other_load", device.OtherLoad())
        apply_threads(plan_threads())
        time.sleep(1.0)
        device.fit_threads_to_load()
        assert torch.get_num_threads() == max(1, usable_cpus()[0] - 1)
        if usable_cpus()[0] > 1:
            assert "kept busy by other processes" in device.applied_threads()
    finally:
        spinner.kill()
        spinner.wait()
        monkeypatch.setattr(device, "_applied", None)
        monkeypatch.setattr(device, "_external_busy", 0.0)
        torch.set_num_threads(before)


def test_a_command_s_process_serves_blocks_up_to_32_mb_from_its_heap():
    """keep_freed_memory: glibc maps a large block from the kernel afresh on each malloc (and
    its pages fault in again) unless told otherwise; after it, up to 32 MB comes from the heap."""
    code = """
import ctypes, sys
from vae_lab.training.device import keep_freed_memory

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype = ctypes.c_void_p

def mapped_by(size):
    block = libc.malloc(size)
    mapped = libc.mallinfo2().hblkhd
    libc.free(ctypes.c_void_p(block))
    return mapped

before = libc.mallinfo2().hblkhd
assert keep_freed_memory()
assert mapped_by(24 << 20) - before < 24 << 20, "24 MB still mapped from the kernel"
assert mapped_by(48 << 20) - before >= 48 << 20, "mallinfo2 does not see mapped blocks"
"""
    env = {key: value for key, value in os.environ.items() if key not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")}
    result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    # a user's own allocator settings win
    result = subprocess.run([PYTHON, "-c", "from vae_lab.training.device import keep_freed_memory\n"
                             "assert not keep_freed_memory()"], capture_output=True, text=True, timeout=120,
                            env={**env, "MALLOC_MMAP_THRESHOLD_": "1000000"})
    assert result.returncode == 0, result.stderr[-2000:]
