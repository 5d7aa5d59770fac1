"""Many machines, for real: two sweep commands from two folders share one PostgreSQL server (the
Optuna storage) and one `mlflow server` on PostgreSQL; one of them is killed mid-trial and rerun."""

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from servers import mlflow_server, postgres_server, runs_of

PYTHON = sys.executable
POINTS = [2, 3, 4, 5, 6, 7]  # model.latent_dim: a grid of 6 points, one training pass each
STUDY = "machines"

# as conftest.TINY_RUN, on scikit-learn's 8x8 digits (loaded in no time); 8 epochs make a trial
# last a few seconds, long enough to kill one in the middle
BASE = {
    "data.name": "digits", "data.train_limit": 512, "data.test_limit": 256,
    "model.hidden_dims": [64], "model.conv_channels": [8, 16, 16], "model.latent_dim": 4,
    "train.epochs": 8, "train.batch_size": 16, "train.progress": False,
    "eval.enabled": False, "tracking.log_model": False, "tracking.log_images": False,
}

@pytest.fixture
def postgres(tmp_path):
    with postgres_server(tmp_path / "postgres") as url:
        yield url


@pytest.fixture
def tracking_server(tmp_path, postgres):
    with mlflow_server(f"{postgres}/mlflow", tmp_path / "artifacts", log_path=tmp_path / "mlflow-server.log") as url:
        yield url


class Trials:
    """The study's Optuna trials, read from PostgreSQL. The storage is opened only once a worker
    has created the study, so the workers themselves race to create Optuna's tables, as they
    would on a fresh database."""

    def __init__(self, url: str, client: MlflowClient):
        self.url, self.client, self.storage = url, client, None

    def __call__(self) -> list:
        if self.storage is None:
            runs = runs_of(self.client)
            if "vae_lab.role" not in runs or not (runs["vae_lab.role"] == "study").any():
                return []
            self.storage = optuna.storages.RDBStorage(self.url)
        try:
            return optuna.load_study(study_name=STUDY, storage=self.storage).get_trials(deepcopy=False)
        except KeyError:  # not created yet
            return []

    def close(self) -> None:
        if self.storage is not None:
            self.storage.engine.dispose()


def worker_env() -> dict:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the command line says where runs go
    return env


def start(command: list[str], folder: Path, log_name: str) -> tuple[subprocess.Popen, Path]:
    folder.mkdir(exist_ok=True)
    log = folder / log_name
    with log.open("w") as stream:
        return subprocess.Popen(command, cwd=folder, env=worker_env(), stdout=stream, stderr=subprocess.STDOUT), log


def wait_for_own_running_child(client: MlflowClient, trials_of: Trials, worker: subprocess.Popen, log: Path,
                               timeout: float = 90) -> int:
    """The trial number of a child run that `worker` is training now (RUNNING in both stores)."""
    me = [socket.gethostname(), str(worker.pid)]  # the trial's "vae_lab.worker" is host:pid[:token]
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert worker.poll() is None, f"the worker ended early ({worker.returncode}):\n{log.read_text()}"
        mine = {str(t.number) for t in trials_of()
                if t.state.name == "RUNNING" and str(t.user_attrs.get("vae_lab.worker")).split(":")[:2] == me}
        if mine:
            runs = runs_of(client)
            if "vae_lab.trial_number" in runs:
                running = runs[(runs["status"] == "RUNNING") & runs["vae_lab.trial_number"].isin(mine)]
                if len(running):
                    return int(running.iloc[0]["vae_lab.trial_number"])
        time.sleep(0.3)
    raise AssertionError(f"the worker started no trial in {timeout:.0f} s:\n{log.read_text()}")


def test_two_machines_on_postgres_and_an_mlflow_server_kill_one_and_rerun(tmp_path, postgres, tracking_server,
                                                                           monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    study_file = tmp_path / "machines.yaml"
    # batch_trials off: latent sizes would pad into one pass, which one machine would claim whole
    study_file.write_text(yaml.safe_dump({"study": {"name": STUDY, "sampler": "grid", "batch_trials": "off"},
                                          "base": BASE,
                                          "search_space": {"model.latent_dim": POINTS}}))
    storage_url = f"{postgres}/optuna"
    command = [PYTHON, "-m", "vae_lab.sweep", str(study_file), "--storage", storage_url,
               "--tracking-uri", tracking_server]
    client = MlflowClient(tracking_server)
    trials_of = Trials(storage_url, client)
    machine_a, machine_b = tmp_path / "machine_a", tmp_path / "machine_b"
    workers: list[subprocess.Popen] = []
    try:
        a, log_a = start(command, machine_a, "sweep.log")
        b, log_b = start(command, machine_b, "sweep-killed.log")
        workers += [a, b]
        wait_for_own_running_child(client, trials_of, b, log_b)
        b.send_signal(signal.SIGKILL)  # a power cut on machine b, mid-trial
        b.wait(timeout=30)
        rerun, log_rerun = start(command, machine_b, "sweep.log")  # the same command again, on machine b
        workers.append(rerun)
        for worker, log in ((a, log_a), (rerun, log_rerun)):
            assert worker.wait(timeout=180) == 0, log.read_text()
        trials = trials_of()
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait(timeout=30)
        trials_of.close()

    runs = runs_of(client)
    assert "RUNNING" not in set(runs["status"]), runs[["run_id", "status"]]  # the killed one too (KILLED or resumed)
    parents = runs[runs["vae_lab.role"] == "study"]
    assert len(parents) == 1 and parents.iloc[0]["status"] == "FINISHED"
    assert parents.iloc[0]["vae_lab.optuna_storage"] == storage_url
    kids = runs[runs["mlflow.parentRunId"] == parents.iloc[0]["run_id"]]
    assert len(kids) == len(runs) - 1
    finished = kids[kids["status"] == "FINISHED"]
    assert sorted(finished["param:model.latent_dim"].astype(int)) == POINTS  # each point once

    assert not [t.number for t in trials if t.state.name in ("RUNNING", "WAITING")]
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert Counter(int(t.params["model.latent_dim"]) for t in complete) == Counter(POINTS)
    assert {t.user_attrs["mlflow_run_id"] for t in complete} == set(finished["run_id"])

    # the workers sent every artifact through the server: it wrote them, they needed no access
    assert list((tmp_path / "artifacts").rglob("study.yaml"))
    assert not (machine_a / "mlruns").exists() and not (machine_b / "mlruns").exists()
