"""Studies that nothing breaks: kill -9 mid-epoch or mid-artifacts, a helper process that dies,
stores that are down, commands with different flags on one store. Real processes, real stores."""

import os
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from test_sweep import PYTHON, children, optuna_trials, run, runs_of, subprocess_env, write_study
from vae_lab import names
from vae_lab.study.storage import POINT_ATTR, WORKER_ATTR

SLOW_DIGITS = {"data.name": "digits", "train.batch_size": 16}


def wait_for(condition, process: subprocess.Popen, timeout: float = 120, what: str = "the condition",
             poll: float = 0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, f"the sweep ended early (exit code {process.returncode}) before {what}"
        try:
            found = condition()
        except Exception:  # the stores are still being created
            found = None
        if found:
            return found
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def running_child_past_epoch(tracking_uri: str, epoch: int):
    """A RUNNING child run whose checkpointed epochs reached `epoch` (metrics are sent after a checkpoint)."""
    runs = runs_of(tracking_uri)
    if "mlflow.parentRunId" not in runs:
        return None
    client = MlflowClient(tracking_uri)
    for run_id in runs[(runs["status"] == "RUNNING") & runs["mlflow.parentRunId"].notna()]["run_id"]:
        if client.get_run(run_id).data.metrics.get(names.EPOCH, 0) >= epoch:
            return run_id
    return None


def final_metrics(tracking_uri: str, study: str) -> dict:
    """{grid point: (val/loss, test/loss, val/loss history steps)} of a study's FINISHED child runs."""
    client = MlflowClient(tracking_uri)
    runs = runs_of(tracking_uri)
    parent = runs[(runs["vae_lab.role"] == "study") & (runs["vae_lab.study_name"] == study)].iloc[0]["run_id"]
    kids = children(runs, parent)
    result = {}
    for _, kid in kids[kids["status"] == "FINISHED"].iterrows():
        metrics = client.get_run(kid["run_id"]).data.metrics
        steps = [m.step for m in client.get_metric_history(kid["run_id"], names.VAL_LOSS)]
        result[kid["param:loss.kl_weight"]] = (metrics[names.VAL_LOSS], metrics["test/loss"], steps)
    return result


@pytest.mark.parametrize("batch_trials", ["off", "auto"], ids=["one trial at a time", "a batch of three"])
def test_sigkill_mid_epoch_then_rerun_continues_the_same_runs_as_if_never_killed(tmp_path, tracking_uri,
                                                                               batch_trials):
    space = {"loss.kl_weight": [0.5, 1.0, 2.0]}
    # a fixed thread count: the continued runs are compared with uninterrupted ones to 1e-6, and a
    # share of the CPUs may shrink beside this test's polling (a count changes a run's last digits)
    path = write_study(tmp_path / "kill.yaml", "kill", space, study={"batch_trials": batch_trials},
                       **SLOW_DIGITS, **{"train.epochs": 12, "threads": 2})
    process = subprocess.Popen([PYTHON, "-m", "vae_lab.sweep", str(path)], env=subprocess_env(tracking_uri),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_run = wait_for(lambda: running_child_past_epoch(tracking_uri, 3), process, what="epoch 3")
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)

    assert run(path, tracking_uri) == 0
    runs = runs_of(tracking_uri)
    assert "RUNNING" not in set(runs["status"])
    kids = children(runs, runs[runs["vae_lab.role"] == "study"].iloc[0]["run_id"])
    assert len(kids) == 3 and set(kids["status"]) == {"FINISHED"}  # the killed runs were continued, not redone
    assert int(kids.set_index("run_id").loc[killed_run, names.RESUMED_FROM_TAG]) >= 3
    trials = optuna_trials(tracking_uri, "kill")
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert sorted(t.user_attrs[POINT_ATTR] for t in complete) == sorted({t.user_attrs[POINT_ATTR] for t in trials})
    assert len(complete) == 3 and not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]

    reference_uri = f"sqlite:///{tmp_path / 'reference' / 'mlflow.db'}"
    assert run(path, reference_uri) == 0
    resumed, reference = final_metrics(tracking_uri, "kill"), final_metrics(reference_uri, "kill")
    assert resumed.keys() == reference.keys()
    for point, (val_loss, test_loss, steps) in reference.items():
        assert resumed[point][0] == pytest.approx(val_loss, rel=1e-6)
        assert resumed[point][1] == pytest.approx(test_loss, rel=1e-6)
        assert resumed[point][2] == steps  # one val/loss per epoch: no gap, no duplicate


def test_sigkill_while_a_batch_writes_its_artifacts_leaves_no_duplicate_run(tmp_path, tracking_uri):
    space = {"loss.kl_weight": [0.5, 1.0, 2.0]}
    path = write_study(tmp_path / "artifacts.yaml", "artifacts", space, **SLOW_DIGITS,
                       **{"train.epochs": 2, "tracking.log_model": True, "tracking.log_images": True})
    process = subprocess.Popen([PYTHON, "-m", "vae_lab.sweep", str(path)], env=subprocess_env(tracking_uri),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    database = tracking_uri.removeprefix("sqlite:///")

    def one_finished_others_running():
        # read the store's tables directly: the window between the batch's first and last finished
        # run is about a second, too short to catch with a full search_runs per poll on a busy machine
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=1) as connection:
            statuses = Counter(status for (status,) in connection.execute(
                "SELECT runs.status FROM runs JOIN tags ON tags.run_uuid = runs.run_uuid "
                "WHERE tags.key = 'mlflow.parentRunId'"))
        return statuses["FINISHED"] >= 1 and statuses["RUNNING"] >= 1
    wait_for(one_finished_others_running, process, what="the batch's first finished run", poll=0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)

    assert run(path, tracking_uri) == 0
    runs = runs_of(tracking_uri)
    kids = runs[runs["mlflow.parentRunId"].notna()]
    assert sorted(kids["param:loss.kl_weight"]) == ["0.5", "1.0", "2.0"]  # three runs in all, each FINISHED once
    assert set(kids["status"]) == {"FINISHED"}
    client = MlflowClient(tracking_uri)
    for run_id in kids["run_id"]:
        assert not client.list_artifacts(run_id, "checkpoint")  # a finished run keeps no training state
        assert [m.step for m in client.get_metric_history(run_id, "test/loss")] == [
            client.get_metric_history(run_id, names.EPOCH)[-1].step]  # test/* logged once
    complete = [t for t in optuna_trials(tracking_uri, "artifacts") if t.state.name == "COMPLETE"]
    assert len(complete) == 3 and len({t.user_attrs[POINT_ATTR] for t in complete}) == 3


def test_a_helper_process_that_dies_is_noticed_and_its_trial_continued(tmp_path, tracking_uri):
    space = {"model.latent_dim": [2, 3, 4, 5]}
    # trials of about 5 s each: 10 epochs took 1.5 s, a window the poll below once missed
    path = write_study(tmp_path / "helper.yaml", "helper", space, study={"batch_trials": "off"},
                       **SLOW_DIGITS, **{"train.epochs": 100})
    log = tmp_path / "sweep.log"
    process = subprocess.Popen([PYTHON, "-m", "vae_lab.sweep", str(path), "--workers", "2"],
                               env=subprocess_env(tracking_uri), stdout=log.open("w"), stderr=subprocess.STDOUT)

    def helper_pid():
        for trial in optuna_trials(tracking_uri, "helper"):
            pid = int(trial.user_attrs.get(WORKER_ATTR, "::").split(":")[1] or 0)
            if trial.state.name == "RUNNING" and pid and pid != process.pid and trial.user_attrs.get(
                    "mlflow_run_id") is None:
                return pid
        return None
    pid = wait_for(helper_pid, process, what="a trial held by the helper process")
    time.sleep(1.5)  # a checkpoint or two
    os.kill(pid, signal.SIGKILL)
    assert process.wait(timeout=240) == 0, log.read_text()
    output = log.read_text()
    assert f"worker process {pid} stopped with exit code -9" in output
    trials = optuna_trials(tracking_uri, "helper")
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert sorted(t.params["model.latent_dim"] for t in complete) == [2, 3, 4, 5]
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    runs = runs_of(tracking_uri)
    kids = runs[runs["mlflow.parentRunId"].notna()]
    assert "RUNNING" not in set(runs["status"])
    assert Counter(kids[kids["status"] == "FINISHED"]["param:model.latent_dim"]).most_common(1)[0][1] == 1


def test_new_study_starts_over_even_when_the_file_is_unchanged(tmp_path, tracking_uri):
    path = write_study(tmp_path / "again.yaml", "again", {"model.latent_dim": [2, 3]})
    assert run(path, tracking_uri) == 0
    assert run(path, tracking_uri) == 0  # resumes: nothing left to run
    runs = runs_of(tracking_uri)
    assert len(runs[runs["vae_lab.role"] == "study"]) == 1 and len(runs) == 3
    assert run(path, tracking_uri, "--new-study") == 0
    runs = runs_of(tracking_uri)
    parents = runs[runs["vae_lab.role"] == "study"]
    assert len(parents) == 2 and set(parents["status"]) == {"FINISHED"}
    for parent in parents["run_id"]:
        assert sorted(children(runs, parent)["param:model.latent_dim"]) == ["2", "3"]
    assert len(optuna_trials(tracking_uri, "again")) == 2  # the new study only


@pytest.mark.parametrize("flags,what", [
    (["--tracking-uri", "http://127.0.0.1:9"], "cannot reach the MLflow tracking server http://127.0.0.1:9"),
    (["--storage", "postgresql://vae:secret@127.0.0.1:9/optuna"],
     "cannot reach the Optuna storage postgresql://vae:***@127.0.0.1:9/optuna"),
], ids=["tracking server", "optuna database"])
def test_a_store_that_is_down_at_the_start_is_one_line_and_exit_2_with_nothing_created(tmp_path, flags, what):
    path = write_study(tmp_path / "down.yaml", "down", {"model.latent_dim": [2, 3]})
    store = tmp_path / "store"
    env = {**subprocess_env(f"sqlite:///{store / 'mlflow.db'}")}
    started = time.time()
    result = subprocess.run([PYTHON, "-m", "vae_lab.sweep", str(path), *flags], env=env, capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    assert time.time() - started < 30
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and what in result.stderr and "secret" not in result.stderr
    assert not store.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["down.yaml"]


def test_a_journal_cut_mid_record_is_repaired_and_a_rerun_finishes_every_point_once(tmp_path, tracking_uri):
    path = write_study(tmp_path / "cut.yaml", "cut", {"model.latent_dim": [2, 3]})
    first = subprocess.run([PYTHON, "-m", "vae_lab.sweep", str(path)], env=subprocess_env(tracking_uri),
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    journal = Path(tracking_uri.removeprefix("sqlite:///")).parent / "optuna.journal"
    with journal.open("r+b") as cut:  # what a power cut (or a full disk) during a write leaves
        cut.truncate(journal.stat().st_size - 60)
    assert not journal.read_bytes().endswith(b"\n")

    rerun = subprocess.run([PYTHON, "-m", "vae_lab.sweep", str(path)], env=subprocess_env(tracking_uri),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "its last record was cut mid-write" in rerun.stderr + rerun.stdout
    assert run(path, tracking_uri) == 0  # the repaired journal reads back, with the rerun's records after it
    complete = [t for t in optuna_trials(tracking_uri, "cut") if t.state.name == "COMPLETE"]
    assert sorted({t.params["model.latent_dim"] for t in complete}) == [2, 3]
    runs = runs_of(tracking_uri)
    kids = runs[runs["mlflow.parentRunId"].notna()]
    assert sorted(kids[kids["status"] == "FINISHED"]["param:model.latent_dim"]) == ["2", "3"]  # each trained once


def test_an_emptied_journal_is_refused_rather_than_the_study_run_again(tmp_path, tracking_uri, capsys):
    path = write_study(tmp_path / "lost.yaml", "lost", {"model.latent_dim": [2]})
    assert run(path, tracking_uri) == 0
    journal = Path(tracking_uri.removeprefix("sqlite:///")).parent / "optuna.journal"
    journal.write_bytes(b"")
    capsys.readouterr()
    assert run(path, tracking_uri) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "has a parent run in MLflow" in error[0] and "--new-study" in error[0]
    assert len(runs_of(tracking_uri)) == 2  # the parent and its one trial: nothing trained again
    assert run(path, tracking_uri, "--new-study") == 0  # the way out: a new study beside the old runs
    assert len(runs_of(tracking_uri)[lambda runs: runs["vae_lab.role"] == "study"]) == 2


def test_a_run_another_worker_starts_while_orphans_are_looked_for_is_not_killed(tmp_path, tracking_uri):
    """`kill_orphan_runs` lists the running trials, then searches the RUNNING runs: a trial
    claimed in between, whose run started before the search, is live, not an orphan. Here
    another worker claims one and starts its run exactly then (inside the search call)."""
    import dataclasses

    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from vae_lab.study.claims import ask_trials
    from vae_lab.study.repair import kill_orphan_runs
    from vae_lab.study.runner import open_session, start_worker
    from vae_lab.study.session import SweepSettings
    from vae_lab.study.spec import load_study_spec

    path = write_study(tmp_path / "orphans.yaml", "orphans", {"model.latent_dim": [2, 3]})
    settings = SweepSettings(spec=load_study_spec(path, []), tracking_uri=tracking_uri,
                             storage_url=f"journal:///{tmp_path / 'optuna.journal'}", progress=False)
    session = open_session(settings)
    other_worker = start_worker(open_session(settings))
    started = []

    class SearchDuringWhichAnotherWorkerStartsARun(MlflowClient):
        def search_runs(self, *args, **kwargs):
            if not started:
                trial = ask_trials(other_worker, count=1)[0]
                experiment_id = self.get_run(session.parent_run_id).info.experiment_id
                started.append(self.create_run(experiment_id, tags={
                    MLFLOW_PARENT_RUN_ID: session.parent_run_id, names.TRIAL_NUMBER_TAG: str(trial.number)}).info.run_id)
            return super().search_runs(*args, **kwargs)

    searching = dataclasses.replace(session, client=SearchDuringWhichAnotherWorkerStartsARun(tracking_uri))
    assert kill_orphan_runs(searching) == 0
    assert started and MlflowClient(tracking_uri).get_run(started[0]).info.status == "RUNNING"
    # a run whose trial no worker runs is still an orphan
    experiment_id = session.client.get_run(session.parent_run_id).info.experiment_id
    orphan = session.client.create_run(experiment_id, tags={MLFLOW_PARENT_RUN_ID: session.parent_run_id,
                                                            names.TRIAL_NUMBER_TAG: "99"}).info.run_id
    assert kill_orphan_runs(session) == 1
    assert session.client.get_run(orphan).info.status == "KILLED"
    assert session.client.get_run(started[0]).info.status == "RUNNING"
