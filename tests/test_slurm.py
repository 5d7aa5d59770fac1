"""`--launcher slurm`, for real: a throwaway single-node Slurm (tests/slurm.py), an `mlflow server`,
a journal storage in a folder every "node" sees. Mid-trial, one array task is sent the time-limit
warning signal (it stops its trial resumable and requeues itself) and the other is preempted
(`scontrol requeue`: SIGTERM, and Slurm requeues it). And the command's bad input."""

import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from servers import mlflow_server, runs_of
from slurm import slurm_cluster, slurm_missing

PYTHON = sys.executable
POINTS = [2, 3, 4, 5, 6, 7]  # model.latent_dim: a grid of 6 points
EPOCHS = 16
STUDY = "cluster"
SECRET = "s3cret-Token"
BASE = {
    "data.name": "digits", "data.train_limit": 512, "data.test_limit": 256,
    "model.hidden_dims": [64], "model.latent_dim": 4,
    "train.epochs": EPOCHS, "train.batch_size": 16, "train.progress": False,
    "eval.enabled": False, "tracking.log_model": False, "tracking.log_images": False,
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = slurm_missing()
    assert missing is None, missing  # `make test` installs Slurm; a plain pytest run needs `make slurm` once
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as running:
        yield running


@pytest.fixture
def tracking_server(tmp_path):
    with mlflow_server(f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}", tmp_path / "artifacts",
                       log_path=tmp_path / "mlflow-server.log") as url:
        yield url


def command_env(cluster) -> dict:
    env = {**cluster.env, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def a_trial_mid_training(client: MlflowClient, sweep: subprocess.Popen, log: Path, not_in_task: str = "",
                         not_run: str = "", timeout: float = 120) -> dict:
    """A RUNNING trial run (not `not_run`) with at least one epoch logged and at least half its
    epochs to go (so it is still training when the signal lands), in another task than `not_in_task`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert sweep.poll() is None, f"the command ended early:\n{log.read_text()}"
        runs = runs_of(client)
        if "vae_lab.slurm_job" in runs:
            running = runs[(runs["status"] == "RUNNING") & runs["vae_lab.slurm_job"].notna()
                           & (runs["vae_lab.slurm_job"] != not_in_task) & (runs["run_id"] != not_run)]
            for _, run in running.iterrows():
                epochs = client.get_metric_history(run["run_id"], "val/loss")  # one value per epoch
                if 1 <= len(epochs) <= EPOCHS // 2:
                    return dict(run)
        time.sleep(0.2)
    raise AssertionError(f"no trial was mid-training within {timeout:.0f} s:\n{log.read_text()}")


def tasks_told(jobs: Path) -> str:
    """What the array tasks printed (a trial that failed says why there), for a failing assertion."""
    return "".join(f"\n--- {path.name}\n{path.read_text(errors='replace')}" for path in sorted(jobs.glob("*_log.out")))


def test_a_grid_on_slurm_with_a_task_at_its_time_limit_and_one_preempted_finishes_every_point_once(
        tmp_path, cluster, tracking_server):
    study_file = tmp_path / "cluster.yaml"
    # batch_trials off: latent sizes would pad into one pass, which one task would claim whole
    study_file.write_text(yaml.safe_dump({"study": {"name": STUDY, "sampler": "grid", "batch_trials": "off"},
                                          "base": BASE, "search_space": {"model.latent_dim": POINTS}}))
    shared = tmp_path / "shared"  # what a cluster's nodes would mount
    jobs = shared / "jobs"
    # a password in the URI (this server ignores it) reaches the tasks, and no file on the shared filesystem
    with_password = tracking_server.replace("http://", f"http://alice:{SECRET}@")
    command = [PYTHON, "-m", "vae_lab.sweep", str(study_file), "--launcher", "slurm", "--workers", "2", "--wait",
               "--slurm", "time=10,cpus_per_task=1,signal_delay_s=60", "--slurm-folder", str(jobs),
               "--storage", f"journal:///{shared / 'optuna.journal'}", "--tracking-uri", with_password]
    client = MlflowClient(tracking_server)
    log = tmp_path / "sweep.log"
    with log.open("w") as stream:
        sweep = subprocess.Popen(command, cwd=tmp_path, env=command_env(cluster), stdout=stream,
                                 stderr=subprocess.STDOUT)
    try:
        stopped = a_trial_mid_training(client, sweep, log)
        task = stopped["vae_lab.slurm_job"]
        # what Slurm sends `signal_delay_s` before the time limit (submitit asks for USR2; USR1 alike)
        subprocess.run(["scancel", "--signal=USR1", task], env=cluster.env, check=True, timeout=30)
        preempted = a_trial_mid_training(client, sweep, log, not_in_task=task, not_run=stopped["run_id"])
        other_task = preempted["vae_lab.slurm_job"]
        # what preemption on a PreemptMode=REQUEUE partition does: SIGTERM to the task, which Slurm requeues
        subprocess.run(["scontrol", "requeue", other_task], env=cluster.env, check=True, timeout=30)
        assert sweep.wait(timeout=240) == 0, log.read_text() + tasks_told(jobs)
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait(timeout=30)
    output = log.read_text()
    assert SECRET not in output
    leaked = [path for path in shared.rglob("*") if path.is_file() and SECRET.encode() in path.read_bytes()]
    assert not leaked
    job_id = task.split("_")[0]
    assert f"submitted Slurm job array {job_id}: 2 workers" in output
    assert f"study {STUDY!r}: 6 complete, 0 pruned, 0 failed (2 stopped and continued by a retry), 0 left" in output, \
        output + tasks_told(jobs)

    runs = runs_of(client)
    assert "RUNNING" not in set(runs["status"]), runs[["run_id", "status"]]
    parents = runs[runs["vae_lab.role"] == "study"]
    assert len(parents) == 1 and parents.iloc[0]["status"] == "FINISHED"
    kids = runs[runs["vae_lab.role"] == "trial"]
    assert len(kids) == len(POINTS) and set(kids["status"]) == {"FINISHED"}, kids[["run_id", "status"]]
    assert Counter(kids["param:model.latent_dim"].astype(int)) == Counter(POINTS)  # each point once

    # the stopped trials went on in their own runs, from their last checkpoints: each epoch logged once
    for trial in (stopped, preempted):
        continued = runs[runs["run_id"] == trial["run_id"]].iloc[0]
        assert int(continued["vae_lab.resumed_from_epoch"]) >= 1
        epochs = sorted(metric.step for metric in client.get_metric_history(trial["run_id"], "val/loss"))
        assert epochs == sorted(set(epochs)) and len(epochs) == EPOCHS, epochs  # one value per epoch, none twice
        steps = [metric.step for metric in client.get_metric_history(trial["run_id"], "train/loss")]
        assert len(steps) == len(set(steps)), sorted(steps)

    # the stopped task requeued itself and ran again (its log, appended to, says so twice)
    task_log = (jobs / f"{task}_0_log.out").read_text()
    assert len(re.findall(r"vae_lab worker in Slurm task", task_log)) == 2, task_log
    assert "stopped by SIGUSR1 (time limit near)" in task_log
    preempted_log = (jobs / f"{other_task}_0_log.out").read_text()
    assert len(re.findall(r"vae_lab worker in Slurm task", preempted_log)) == 2, preempted_log
    assert "stopped by SIGTERM" in preempted_log
    for each in (task, other_task):
        shown = subprocess.run(["scontrol", "show", "job", each], env=cluster.env, capture_output=True, text=True)
        assert "Restarts=1" in shown.stdout, shown.stdout


# ----------------------------------------------------------------------------- bad input

def sweep_main(*argv: str) -> int:
    from vae_lab.sweep import main

    return main(list(argv))


@pytest.fixture
def study_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"study": {"name": STUDY, "sampler": "grid"}, "base": BASE,
                                    "search_space": {"model.latent_dim": POINTS}}))
    return path


def one_line_and_nothing_created(capsys, tmp_path, *needles: str) -> None:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err
    assert [path.name for path in tmp_path.iterdir()] == ["cluster.yaml"]  # no store, no job folder


SHARED_STORES = ("--tracking-uri", "http://127.0.0.1:9", "--storage", "journal:///shared/optuna.journal")


def test_an_unknown_launcher_is_one_line(study_file, tmp_path, capsys):
    assert sweep_main(str(study_file), "--launcher", "pbs") == 2
    one_line_and_nothing_created(capsys, tmp_path, "--launcher must be one of local, slurm", "'pbs'")


def test_slurm_options_without_the_slurm_launcher_are_refused(study_file, tmp_path, capsys):
    assert sweep_main(str(study_file), "--wait") == 2
    one_line_and_nothing_created(capsys, tmp_path, "go with --launcher slurm")


@pytest.mark.parametrize("stores, needle", [
    ((), "cannot share the SQLite file"),  # the default MLflow store: a file on this machine
    (("--tracking-uri", "http://127.0.0.1:9"), "cannot share the default Optuna journal"),
    (("--tracking-uri", "http://127.0.0.1:9", "--storage", "sqlite:////tmp/optuna.db"), "cannot share the SQLite file"),
])
def test_the_slurm_launcher_refuses_stores_other_nodes_cannot_share(study_file, tmp_path, capsys, cluster,
                                                                    monkeypatch, stores, needle):
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    assert sweep_main(str(study_file), "--launcher", "slurm", *stores) == 2
    one_line_and_nothing_created(capsys, tmp_path, needle, "postgresql://", "journal:///shared")


def test_the_slurm_launcher_without_sbatch_is_one_line(study_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(Path(PYTHON).parent))  # no sbatch there
    assert sweep_main(str(study_file), "--launcher", "slurm", *SHARED_STORES) == 2
    one_line_and_nothing_created(capsys, tmp_path, "needs Slurm's sbatch on the PATH")


@pytest.mark.parametrize("options, needle", [
    ("partiton=gpu", "--slurm partiton: not an option of sbatch (allowed: account, array_parallelism"),
    ("array=0-99", "--slurm array is set by vae_lab; use --workers"),
    ("time=soon", "--slurm time='soon' is not a time limit"),
    ("array_parallelism=0", "must be a whole number, 1 or more"),
])
def test_a_bad_slurm_option_is_one_line_and_submits_nothing(study_file, tmp_path, capsys, cluster, monkeypatch,
                                                           options, needle):
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    before = subprocess.run(["squeue", "-h", "-o", "%i"], env=cluster.env, capture_output=True, text=True).stdout
    assert sweep_main(str(study_file), "--launcher", "slurm", "--slurm", options, *SHARED_STORES) == 2
    one_line_and_nothing_created(capsys, tmp_path, needle)
    after = subprocess.run(["squeue", "-h", "-o", "%i"], env=cluster.env, capture_output=True, text=True).stdout
    assert after == before


def test_slurm_options_pass_through_to_submitit_and_sbatch(cluster, monkeypatch):
    from vae_lab.study.slurm import minutes, slurm_options

    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    assert slurm_options("partition=gpu,time=04:00:00,gpus_per_task=1,cpus_per_task=4,array_parallelism=8,"
                         "exclude=node[1,2],reservation=maintenance,requeue") == {
        "partition": "gpu", "time": 240, "gpus_per_task": "1", "cpus_per_task": "4", "array_parallelism": 8,
        "exclude": "node[1,2]", "additional_parameters": {"reservation": "maintenance", "requeue": True}}
    assert [minutes(text) for text in ("90", "1:30", "2:00:00", "1-00", "1-2:30", "0:0:30")] == [90, 2, 120, 1440, 1590, 1]


def test_dry_run_says_what_it_would_submit(study_file, tmp_path, capsys, cluster, monkeypatch, tracking_server):
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    journal = tmp_path / "shared" / "optuna.journal"
    assert sweep_main(str(study_file), "--launcher", "slurm", "--workers", "4", "--dry-run",
                      "--slurm", "partition=debug,time=30,array_parallelism=2",
                      "--tracking-uri", tracking_server, "--storage", f"journal:///{journal}") == 0
    out = capsys.readouterr().out
    assert "6 grid points" in out
    assert "would submit one Slurm job array of 4 tasks with partition=debug, time=30, array_parallelism=2" in out
    assert not journal.exists() and not (tmp_path / "slurm").exists()
