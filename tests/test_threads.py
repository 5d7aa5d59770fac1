"""Each process takes its share of the CPUs it may use (issue 22, part 1): the affinity mask or
Slurm's CPUs per task, divided among this machine's --workers; `threads` or OMP_NUM_THREADS
override it; the run records what ran."""

import os
import subprocess

from mlflow.tracking import MlflowClient

from conftest import TINY_RUN
from test_sweep import PYTHON, subprocess_env
from vae_lab import names
from vae_lab.training.device import plan_threads, usable_cpus


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
