"""The Optuna storage proxy (`python -m vae_lab.storage_proxy`, workers on `--storage grpc://`),
against a real PostgreSQL and a real proxy: what the sweep's workers do through it (claims,
heartbeats, a proxy or database that goes away), a grid sweep of two commands, and bad input."""

import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from servers import free_port, postgres_cluster
from test_sweep import runs_of
from vae_lab.study import storage as store
from vae_lab.study.patient_storage import impatient
from vae_lab.tracking.errors import is_store_error

PYTHON = sys.executable
CHECKOUT = Path(__file__).resolve().parents[1]
POINTS = [2, 3, 4, 5, 6]
BASE = {
    "data.name": "digits", "data.train_limit": 256, "data.test_limit": 128,
    "model.hidden_dims": [32], "model.conv_channels": [8, 16, 16], "model.latent_dim": 4,
    "train.epochs": 1, "train.batch_size": 32, "train.progress": False,
    "eval.enabled": False, "tracking.log_model": False, "tracking.log_images": False,
}


def command_env() -> dict:
    # this checkout's vae_lab whatever the folder a command runs in (an editable install may point elsewhere)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(CHECKOUT), os.environ.get("PYTHONPATH")]))}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with postgres_cluster(tmp_path_factory.mktemp("postgres")) as running:
        yield running


@pytest.fixture
def database(cluster, request):
    """A fresh, empty database of its own on the module's PostgreSQL: its URL."""
    name = re.sub(r"\W", "_", request.node.name.lower())[:40]
    with cluster._connect("postgres") as connection:
        connection.execute(f"DROP DATABASE IF EXISTS {name}")
        connection.execute(f"CREATE DATABASE {name}")
    yield f"{cluster.url}/{name}"


@pytest.fixture
def proxy_command(database):
    """`python -m vae_lab.storage_proxy` on a free port: (its process, the grpc:// URL it printed)."""
    process = subprocess.Popen([PYTHON, "-m", "vae_lab.storage_proxy", "--storage", database, "--port", "0"],
                               cwd=CHECKOUT, env=command_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        line = process.stdout.readline()
        found = re.search(r"--storage (grpc://\S+)", line)
        assert found, line + process.stdout.read()
        yield process, found.group(1)
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)
        process.stdout.close()


@pytest.fixture
def proxy(database):
    """A proxy served in this process (`storage.serve_storage`): (start, stop, its grpc:// URL);
    `start()` again after `stop()` is a restarted proxy on the same port."""
    servers, port = [], free_port()

    def start():
        server, _ = store.serve_storage(database, "127.0.0.1", port)
        servers.append(server)

    def stop():
        servers[-1].stop(grace=None).wait()

    start()
    yield start, stop, f"grpc://127.0.0.1:{port}"
    for server in servers:
        server.stop(grace=None).wait()


def enqueue(url: str, count: int) -> optuna.Study:
    study = optuna.create_study(storage=store.open_storage(url), study_name="through")
    for x in range(count):
        study.enqueue_trial(params={"x": float(x)})
    return study


def test_claims_are_atomic_and_heartbeats_fresh_through_the_proxy(proxy):
    _, _, url = proxy
    first = store.open_storage(url)
    study_a = enqueue(url, 4)
    second = store.open_storage(url)  # another worker, its own client and cache
    study_b = optuna.load_study(study_name="through", storage=second)
    assert [t.state for t in study_b.get_trials()] == [TrialState.WAITING] * 4  # cached by worker b now

    trial_id = store.trial_id(first, study_a, 0)
    assert first.set_trial_state_values(trial_id, state=TrialState.RUNNING) is True
    assert second.set_trial_state_values(trial_id, state=TrialState.RUNNING) is False  # one worker per point
    claimed = [store.pop_waiting_trial(study, storage).number
               for study, storage in ((study_b, second), (study_a, first), (study_b, second))]
    assert sorted(claimed) == [1, 2, 3]
    assert store.pop_waiting_trial(study_a, first) is None

    # a heartbeat written by worker a is what worker b reads next (its cache re-reads running trials)
    first.set_trial_user_attr(trial_id, store.HEARTBEAT_ATTR, 1000.0)
    assert study_b.get_trials()[0].user_attrs[store.HEARTBEAT_ATTR] == 1000.0
    first.set_trial_user_attr(trial_id, store.HEARTBEAT_ATTR, 2000.0)
    assert study_b.get_trials()[0].user_attrs[store.HEARTBEAT_ATTR] == 2000.0
    study_a.set_user_attr(store.READY_ATTR, True)
    assert second.get_study_user_attrs(second.get_study_id_from_name("through"))[store.READY_ATTR] is True

    # a repair by worker b (FAIL) is what worker a's next heartbeat meets: the refusal, not an outage
    second.set_trial_state_values(trial_id, state=TrialState.FAIL)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        impatient(first).set_trial_user_attr(trial_id, store.HEARTBEAT_ATTR, 3000.0)
    assert study_b.get_trials()[0].state == TrialState.FAIL


def test_a_restarted_proxy_is_waited_for_and_takes_a_trial_claimed_before_it(proxy):
    start, stop, url = proxy
    storage = store.open_storage(url)
    study = enqueue(url, 1)
    trial = store.pop_waiting_trial(study, storage)
    stop()
    with pytest.raises(Exception) as down:
        impatient(storage).get_all_studies()
    assert is_store_error(down.value)  # an outage to wait out, not a refusal

    answered = []
    waiting = threading.Thread(target=lambda: answered.append(storage.get_study_user_attrs(storage.get_study_id_from_name("through"))))
    waiting.start()
    waiting.join(timeout=3)
    assert waiting.is_alive()  # PatientStorage retries every 2 s while the proxy is gone
    start()
    waiting.join(timeout=30)
    assert answered == [{}]
    # the new proxy has read no trial yet: the claimed trial's parameters are still taken
    assert trial.suggest_float("x", 0.0, 5.0) == 0.0
    study.tell(trial, 1.0)
    assert study.get_trials()[0].state == TrialState.COMPLETE


def test_a_database_outage_behind_the_proxy_reaches_the_workers_as_an_outage(cluster, proxy):
    _, _, url = proxy
    storage = store.open_storage(url)
    study = enqueue(url, 1)
    cluster.stop_immediately()
    try:
        with pytest.raises(Exception) as down:
            impatient(storage).get_study_user_attrs(study._study_id)
        assert is_store_error(down.value), down.value
    finally:
        cluster.start()
    assert storage.get_study_user_attrs(storage.get_study_id_from_name("through")) == {}


def write_grid(path: Path) -> Path:
    path.write_text(yaml.safe_dump({"study": {"name": "proxied", "sampler": "grid", "batch_trials": "off"},
                                    "base": BASE, "search_space": {"model.latent_dim": POINTS}}))
    return path


def test_two_sweep_commands_through_the_proxy_run_each_grid_point_once(tmp_path, database, proxy_command):
    process, url = proxy_command
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study_file = write_grid(tmp_path / "grid.yaml")
    command = [PYTHON, "-m", "vae_lab.sweep", str(study_file), "--storage", url, "--tracking-uri", tracking_uri]
    dry = subprocess.run([*command, "--dry-run"], cwd=tmp_path, env=command_env(), capture_output=True, text=True,
                         timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert optuna.get_all_study_names(storage=database) == []  # the dry run created nothing

    workers = [subprocess.Popen(command, cwd=tmp_path, env=command_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [worker.communicate(timeout=240)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], "\n".join(outputs)
    assert process.poll() is None

    runs = runs_of(tracking_uri)
    parents = runs[runs["vae_lab.role"] == "study"]
    assert len(parents) == 1 and parents.iloc[0]["status"] == "FINISHED"
    assert parents.iloc[0]["vae_lab.optuna_storage"] == url
    kids = runs[runs["mlflow.parentRunId"] == parents.iloc[0]["run_id"]]
    assert sorted(kids["param:model.latent_dim"].astype(int)) == POINTS and set(kids["status"]) == {"FINISHED"}
    trials = [t for t in optuna.load_study(study_name="proxied", storage=database).get_trials()
              if not t.user_attrs.get(store.SKIPPED_ATTR)]
    assert Counter(int(t.params["model.latent_dim"]) for t in trials if t.state == TrialState.COMPLETE) \
        == Counter(POINTS)
    assert not [t.number for t in trials if t.state != TrialState.COMPLETE]

    process.send_signal(2)  # Ctrl-C
    assert process.wait(timeout=30) == 0
    assert process.stdout.read().strip() == "stopped"


def test_a_proxy_that_does_not_answer_is_one_line_and_exit_2_and_nothing_is_created(tmp_path):
    study_file = write_grid(tmp_path / "grid.yaml")
    silent = socket.socket()  # listens, accepts (the kernel does), never speaks gRPC
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        for url in (f"grpc://127.0.0.1:{free_port()}", f"grpc://127.0.0.1:{silent.getsockname()[1]}"):
            started = time.monotonic()
            result = subprocess.run([PYTHON, "-m", "vae_lab.sweep", str(study_file), "--storage", url,
                                     "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
                                    cwd=tmp_path, env=command_env(), capture_output=True, text=True, timeout=60)
            assert result.returncode == 2, result.stderr
            assert time.monotonic() - started < 30
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: ") and url in lines[0], result.stderr
    finally:
        silent.close()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["grid.yaml"]


@pytest.mark.parametrize("arguments, says", [
    (["--storage", "journal:///{tmp}/optuna.journal"], "does not serve a journal file"),
    (["--storage", "sqlite:///{tmp}/optuna.db"], "does not serve an SQLite file"),
    (["--storage", "grpc://127.0.0.1:13000"], "is not a database URL"),
    (["--storage", "postgresql://user:hunter2@127.0.0.1:{closed}/optuna"], "cannot reach the Optuna storage"),
    (["--storage", "postgresql://127.0.0.1/optuna", "--port", "70000"], "--port 70000 is out of range"),
])
def test_the_proxy_command_refuses_bad_input_in_one_line(tmp_path, arguments, says):
    arguments = [argument.format(tmp=tmp_path, closed=free_port()) for argument in arguments]
    result = subprocess.run([PYTHON, "-m", "vae_lab.storage_proxy", *arguments], cwd=tmp_path, env=command_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], result.stderr
    assert "hunter2" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_proxy_command_refuses_a_port_in_use(database, proxy_command):
    _, url = proxy_command
    port = url.rsplit(":", 1)[1]
    result = subprocess.run([PYTHON, "-m", "vae_lab.storage_proxy", "--storage", database, "--port", port],
                            cwd=CHECKOUT, env=command_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}") and result.stderr.count("\n") == 1


def test_a_grpc_storage_that_is_not_an_address_is_one_line():
    with pytest.raises(store.ConfigError, match="allowed: grpc://HOST:PORT"):
        store.check_optuna_storage("grpc://user:pw@host:1/optuna")
    assert store.proxy_address("grpc://[::1]") == ("::1", store.DEFAULT_PROXY_PORT)
