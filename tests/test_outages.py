"""Stores that fail mid-study, for real: the Optuna PostgreSQL stopped (`pg_ctl stop -m
immediate`) and started again, a network cut between one worker and the storage, a disk that
fills up, checkpoints overwritten. Training goes on, bookkeeping waits; what cannot wait stops
in one line, exit 1, and a rerun finishes every point once, continuing each run where it was."""

import contextlib
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from servers import TcpProxy, mlflow_server, postgres_cluster
from test_crash_proof import SLOW_DIGITS, running_child_past_epoch, wait_for
from test_sweep import PYTHON, children, runs_of, subprocess_env, write_study
from vae_lab import names
from vae_lab.study.storage import POINT_ATTR, open_storage

SPACE = {"loss.kl_weight": [0.5, 1.0]}
# 7,680 steps (about 25 s here): still training well after a claim is lost (4 beats of 1 s)
LONG_TRIAL = {"data.train_limit": 2048, "train.batch_size": 16, "train.epochs": 60}


@pytest.fixture
def cluster(tmp_path):
    with postgres_cluster(tmp_path / "postgres") as cluster:
        yield cluster


def sweep(path: Path, tracking_uri: str, storage: str | None, env: dict | None = None, **popen) -> subprocess.Popen:
    command = [PYTHON, "-m", "vae_lab.sweep", str(path), "--tracking-uri", tracking_uri]
    if storage:
        command += ["--storage", storage]
    return subprocess.Popen(command, env={**subprocess_env(tracking_uri), **(env or {})}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def finished(process: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def assert_every_point_finished_once(tracking_uri: str, storage: str, study: str, points: int) -> None:
    runs = runs_of(tracking_uri)
    parent = runs[(runs["vae_lab.role"] == "study") & (runs["vae_lab.study_name"] == study)].iloc[0]
    assert parent["status"] == "FINISHED"
    kids = children(runs, parent["run_id"])
    finished_kids = kids[kids["status"] == "FINISHED"]
    assert sorted(Counter(finished_kids["param:loss.kl_weight"]).values()) == [1] * points  # each point once
    client = MlflowClient(tracking_uri)
    for run_id in finished_kids["run_id"]:
        steps = [metric.step for metric in client.get_metric_history(run_id, names.EPOCH)]
        assert steps == sorted(set(steps)), run_id  # no epoch logged twice: one trainer at a time
        assert [m.value for m in client.get_metric_history(run_id, names.EPOCH)] == list(
            range(1, len(steps) + 1))
    trials = optuna.load_study(study_name=study, storage=open_storage(storage)).get_trials()
    complete = [trial for trial in trials if trial.state.name == "COMPLETE"]
    assert len(complete) == points and len({trial.user_attrs[POINT_ATTR] for trial in complete}) == points
    assert not [trial for trial in trials if trial.state.name in ("RUNNING", "WAITING")]


def test_a_30_second_outage_of_the_optuna_postgresql_is_ridden_through(tmp_path, tracking_uri, cluster):
    storage = f"{cluster.url}/optuna"
    path = write_study(tmp_path / "blink.yaml", "blink", SPACE, study={"batch_trials": "off"}, **SLOW_DIGITS,
                       **{"train.epochs": 12})
    process = sweep(path, tracking_uri, storage)
    wait_for(lambda: running_child_past_epoch(tracking_uri, 2), process, what="epoch 2")
    cluster.stop_immediately()
    time.sleep(30)
    assert process.poll() is None, process.communicate()  # still training through the outage
    cluster.start()
    code, out, err = finished(process)
    assert code == 0, err
    assert "Traceback" not in err
    # said, with the storage named: by the bookkeeping that waited, or by the heartbeat that failed
    assert "cannot be reached; waiting for it" in err or "could not renew the heartbeat" in err, err
    assert_every_point_finished_once(tracking_uri, storage, "blink", len(SPACE["loss.kl_weight"]))


def test_a_long_optuna_outage_stops_in_one_line_and_a_rerun_continues_each_run(tmp_path, tracking_uri, cluster):
    storage = f"{cluster.url}/optuna"
    # the trial stops 4 beats (4 s) into the outage, long before its 60 epochs are done
    path = write_study(tmp_path / "outage.yaml", "outage", {"loss.kl_weight": [1.0]}, **LONG_TRIAL)
    patience = {"VAE_LAB_STORE_PATIENCE_SECONDS": "10", "VAE_LAB_HEARTBEAT_SECONDS": "1"}
    process = sweep(path, tracking_uri, storage, env=patience)
    stopped_run = wait_for(lambda: running_child_past_epoch(tracking_uri, 2), process, what="epoch 2")
    cluster.stop_immediately()
    code, out, err = finished(process, timeout=180)
    assert code == 1, err
    assert "trial 0 stopped: its heartbeat could not be renewed" in out, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: the Optuna storage postgresql://postgres@127.0.0.1") and "rerun" in last, err
    assert "Traceback" not in err
    runs = runs_of(tracking_uri)
    assert "RUNNING" not in set(runs["status"])  # the parent and the trial's run were ended (KILLED)
    killed = runs.set_index("run_id").loc[stopped_run]
    assert killed["status"] == "KILLED"

    cluster.start()
    code, out, err = finished(sweep(path, tracking_uri, storage, env=patience))
    assert code == 0, err
    runs = runs_of(tracking_uri).set_index("run_id")
    assert runs.loc[stopped_run, "status"] == "FINISHED"  # continued, not trained again
    assert int(runs.loc[stopped_run, names.RESUMED_FROM_TAG]) >= 2
    assert_every_point_finished_once(tracking_uri, storage, "outage", 1)


def test_a_worker_cut_off_from_the_storage_stops_its_trial_before_another_takes_it_over(tmp_path, tracking_uri,
                                                                                       cluster):
    """Worker A reaches PostgreSQL through a proxy that is cut mid-trial; worker B, which still
    reaches it, finds the trial stale and continues its run. A must have stopped training first:
    the run's epochs are each logged once."""
    path = write_study(tmp_path / "cut.yaml", "cut", {"loss.kl_weight": [1.0]}, **LONG_TRIAL)
    beats = {"VAE_LAB_HEARTBEAT_SECONDS": "1", "VAE_LAB_STORE_PATIENCE_SECONDS": "30"}
    proxy = TcpProxy(cluster.port)
    through_proxy = f"postgresql://postgres@127.0.0.1:{proxy.port}/optuna"
    worker_a = sweep(path, tracking_uri, through_proxy, env=beats)
    run_id = wait_for(lambda: running_child_past_epoch(tracking_uri, 2), worker_a, what="epoch 2")
    proxy.cut()
    time.sleep(6 + 2)  # past STALE_AFTER beats of 1 s: B may take the trial over at once
    code_b, out_b, err_b = finished(sweep(path, tracking_uri, f"{cluster.url}/optuna", env=beats))
    code_a, out_a, err_a = finished(worker_a, timeout=120)
    assert code_b == 0, err_b
    assert "was left running (no heartbeat" in out_b + err_b
    assert code_a == 1 and "Traceback" not in err_a, err_a
    assert "trial 0 stopped: its heartbeat could not be renewed" in out_a, out_a
    runs = runs_of(tracking_uri).set_index("run_id")
    assert runs.loc[run_id, "status"] == "FINISHED" and int(runs.loc[run_id, names.RESUMED_FROM_TAG]) >= 2
    assert_every_point_finished_once(tracking_uri, f"{cluster.url}/optuna", "cut", 1)


def test_checkpoints_overwritten_in_both_slots_are_said_and_the_trial_starts_over_in_a_new_run(tmp_path,
                                                                                              tracking_uri):
    path = write_study(tmp_path / "bytes.yaml", "bytes", {"loss.kl_weight": [1.0]}, **SLOW_DIGITS,
                       **{"train.epochs": 8})
    process = sweep(path, tracking_uri, None)
    killed = wait_for(lambda: running_child_past_epoch(tracking_uri, 3), process, what="epoch 3")
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    client = MlflowClient(tracking_uri)
    artifacts = Path(client.get_run(killed).info.artifact_uri.removeprefix("file://")) / "checkpoint"
    for slot in ("a.pt", "b.pt"):
        data = bytearray((artifacts / slot).read_bytes())
        data[len(data) // 2:len(data) // 2 + 64] = random.Random(slot).randbytes(64)
        (artifacts / slot).write_bytes(bytes(data))

    code, out, err = finished(sweep(path, tracking_uri, None))
    assert code == 0, err
    said = [line for line in out.splitlines() if "cannot continue" in line]
    assert said == [f"trial 1: run {killed} cannot continue: its checkpoints are corrupt (slot a.pt: its checksum "
                    "does not match its contents (corrupt or cut short); slot b.pt: its checksum does not match "
                    "its contents (corrupt or cut short)); trial 1 starts over in a new run"], out
    runs = runs_of(tracking_uri).set_index("run_id")
    assert runs.loc[killed, "status"] == "FAILED" and "checkpoints are corrupt" in runs.loc[killed, "failure_reason"]
    fresh = runs[(runs["status"] == "FINISHED") & (runs["vae_lab.role"] == "trial")]
    assert len(fresh) == 1 and fresh.index[0] != killed
    assert not isinstance(fresh.iloc[0].get(names.RESUMED_FROM_TAG), str)  # trained from epoch 1


@contextlib.contextmanager
def small_disk(folder: Path, size: str = "64m"):
    """A tmpfs of `size` at `folder`, unmounted at the end."""
    folder.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> Path:
    """Write a file until the disk is full; returns it (delete it to free the space)."""
    filler = folder / "filler"
    with filler.open("wb") as out:
        with contextlib.suppress(OSError):
            while True:
                out.write(b"\0" * (1 << 20))
                out.flush()
    with contextlib.suppress(OSError):
        with filler.open("ab") as out:  # the last bytes a partial write left
            while True:
                out.write(b"\0" * 4096)
                out.flush()
    return filler


def test_a_full_disk_stops_in_one_line_and_a_rerun_after_space_returns_finishes_every_point_once(tmp_path):
    with small_disk(tmp_path / "disk") as disk:
        tracking_uri = f"sqlite:///{disk / 'mlflow.db'}"
        storage = f"journal:///{disk / 'optuna.journal'}"
        path = write_study(tmp_path / "full.yaml", "full", {"loss.kl_weight": [1.0]}, **LONG_TRIAL)
        patience = {"VAE_LAB_STORE_PATIENCE_SECONDS": "8"}
        process = sweep(path, tracking_uri, storage, env=patience)
        wait_for(lambda: running_child_past_epoch(tracking_uri, 2), process, what="epoch 2")
        filler = fill(disk)
        code, out, err = finished(process, timeout=240)
        assert code == 1, err
        assert err.strip().splitlines()[-1].startswith("error: ") and "rerun" in err.strip().splitlines()[-1], err
        assert "Traceback" not in err, err

        filler.unlink()
        code, out, err = finished(sweep(path, tracking_uri, storage, env=patience))
        assert code == 0, err
        assert_every_point_finished_once(tracking_uri, storage, "full", 1)


def test_a_trial_stopped_by_a_tracking_outage_continues_its_own_run(tmp_path):
    """The MLflow server goes away mid-trial and stays away: the command stops in one line; the
    retry, once a server is back, continues the trial's own run from its checkpoint (whether it
    can is asked then, not while the store was down)."""
    backend, artifacts = f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "artifacts"
    storage = f"journal:///{tmp_path / 'optuna.journal'}"
    path = write_study(tmp_path / "gone.yaml", "gone", {"loss.kl_weight": [1.0]}, **LONG_TRIAL)
    patience = {"VAE_LAB_STORE_PATIENCE_SECONDS": "8"}
    with mlflow_server(backend, artifacts) as first:
        process = sweep(path, first, storage, env=patience)
        stopped_run = wait_for(lambda: running_child_past_epoch(first, 2), process, what="epoch 2")
    code, out, err = finished(process, timeout=240)  # the server is gone
    assert code == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "rerun" in last and "Traceback" not in err, err
    with mlflow_server(backend, artifacts) as second:  # back, on another port
        code, out, err = finished(sweep(path, second, storage, env=patience))
        assert code == 0, err
        runs = runs_of(second).set_index("run_id")
        trials = runs[runs["vae_lab.role"] == "trial"]
        assert list(trials.index) == [stopped_run]  # one run for the point: the stopped one, continued
        assert trials.loc[stopped_run, "status"] == "FINISHED"
        assert int(trials.loc[stopped_run, names.RESUMED_FROM_TAG]) >= 2
        assert_every_point_finished_once(second, storage, "gone", 1)
