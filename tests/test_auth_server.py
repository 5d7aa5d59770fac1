"""An authenticated tracking server, for real: `mlflow server --app-name basic-auth` on an SQLite
store, its users in tmp_path, an admin with a random password. A sweep given the credentials in
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD finishes and shows the password nowhere; one
given a wrong password, or none, stops with one line before it creates anything."""

import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from mlflow.tracking import MlflowClient

import servers
from vae_lab.tracking.checks import StoreUnreachable, check_tracking_store
from vae_lab.tracking.uris import redact

PYTHON = sys.executable
CHECKOUT = Path(__file__).resolve().parents[1]
ADMIN = "admin"
PASSWORD = f"pw-{secrets.token_hex(8)}"  # also what is looked for in every output and record
POINTS = [2, 3]  # model.latent_dim
BASE = {  # as tests/test_many_machines.py, one epoch
    "data.name": "digits", "data.train_limit": 256, "data.test_limit": 128,
    "model.hidden_dims": [32], "model.latent_dim": 2,
    "train.epochs": 1, "train.batch_size": 32, "train.progress": False,
    "eval.enabled": False, "tracking.log_model": False, "tracking.log_images": False,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("auth-server")
    auth_config = servers.write_basic_auth_config(folder / "auth", ADMIN, PASSWORD)
    with servers.mlflow_server(f"sqlite:///{folder / 'mlflow.db'}", folder / "artifacts",
                               log_path=folder / "server.log", auth_config=auth_config) as url:
        admin_uri = url.replace("http://", f"http://{ADMIN}:{PASSWORD}@")
        yield SimpleNamespace(url=url, folder=folder, admin=MlflowClient(admin_uri))


def command_env(**credentials: str) -> dict:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1",
           # the commands import this checkout's vae_lab, whatever copy is installed
           "PYTHONPATH": os.pathsep.join(filter(None, [str(CHECKOUT), os.environ.get("PYTHONPATH")]))}
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                 "MLFLOW_TRACKING_TOKEN"):
        env.pop(name, None)
    return {**env, **credentials}


def run(module: str, *args: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([PYTHON, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def write_study(path: Path) -> Path:
    path.write_text(yaml.safe_dump({"study": {"name": "auth", "sampler": "grid"}, "base": BASE,
                                    "search_space": {"model.latent_dim": POINTS}}))
    return path


def server_contents(client: MlflowClient) -> tuple[list, list]:
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments], max_results=1000)
    return sorted(e.name for e in experiments), sorted(r.info.run_id for r in runs)


def files_holding(marker: str, *places: Path) -> list[str]:
    files = [path for place in places for path in ([place] if place.is_file() else place.rglob("*"))]
    return [str(path) for path in files if path.is_file() and marker.encode() in path.read_bytes()]


def test_the_rest_api_asks_for_a_login_and_health_does_not(server):
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{server.url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
    assert refused.value.code == 401
    with urllib.request.urlopen(f"{server.url}/health", timeout=10) as response:
        assert response.status == 200


def test_a_user_without_permission_gets_one_line_saying_so(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    # as a server whose users may not read experiments (the real one lets every user search them)
    with servers.answering_server(lambda path: 200 if path == "/health" else 403) as (url, _):
        with pytest.raises(StoreUnreachable) as refused:
            check_tracking_store(url)
    assert str(refused.value).startswith(f"the MLflow tracking server {url} denies user 'bob' permission")
    assert "HTTP 403" in str(refused.value) and "\n" not in str(refused.value) and PASSWORD not in str(refused.value)


WRONG = "pw-wrong-5e1d"


@pytest.mark.parametrize("command, credentials, expected", [
    ("sweep", {"MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": WRONG}, "refused the credentials of user 'admin'"),
    ("sweep", {}, "needs a login and none was given"),
    ("sweep", {"in_uri": f"{ADMIN}:{WRONG}"}, "refused the credentials of user 'admin' (HTTP 401); check the user:password in the tracking URI"),
    ("train", {"MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": WRONG}, "refused the credentials of user 'admin'"),
], ids=["sweep-wrong-password", "sweep-no-credentials", "sweep-wrong-password-in-uri", "train-wrong-password"])
def test_refused_or_missing_credentials_stop_a_command_with_one_line_before_it_creates_anything(
        server, tmp_path, command, credentials, expected):
    before = server_contents(server.admin)
    uri = server.url
    if "in_uri" in credentials:
        uri = uri.replace("http://", f"http://{credentials.pop('in_uri')}@")
    cwd, journal = tmp_path / "cwd", tmp_path / "optuna.journal"
    if command == "sweep":
        study = write_study(tmp_path / "auth.yaml")
        args = [str(study), "--tracking-uri", uri, "--storage", f"journal:///{journal}"]
    else:
        args = [f"{key}={value}" for key, value in BASE.items()] + [f"tracking.uri={uri}"]
    result = run(f"vae_lab.{command}", *args, cwd=cwd, env=command_env(**credentials))

    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert f"the MLflow tracking server {redact(uri)} " in lines[0]
    assert expected in lines[0]
    assert "MLFLOW_TRACKING_USERNAME" in lines[0] or "user:password" in lines[0]
    assert WRONG not in result.stdout + result.stderr and PASSWORD not in result.stdout + result.stderr
    assert server_contents(server.admin) == before
    assert list(cwd.iterdir()) == [] and not journal.exists()


def test_a_sweep_with_the_credentials_in_the_environment_finishes_and_shows_the_password_nowhere(server, tmp_path):
    study = write_study(tmp_path / "auth.yaml")
    env = command_env(MLFLOW_TRACKING_USERNAME=ADMIN, MLFLOW_TRACKING_PASSWORD=PASSWORD)
    said = [run("vae_lab.sweep", str(study), "--tracking-uri", server.url,
                "--storage", f"journal:///{tmp_path / 'optuna.journal'}", cwd=tmp_path / "cwd", env=env)]
    assert said[0].returncode == 0, said[0].stderr[-3000:]

    experiment = server.admin.get_experiment_by_name("vae_lab")
    runs = server.admin.search_runs([experiment.experiment_id], max_results=1000)
    (parent,) = [r for r in runs if r.data.tags.get("vae_lab.role") == "study"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(children) == len(runs) - 1
    assert all(r.info.status == "FINISHED" for r in children)
    assert sorted(int(r.data.params["model.latent_dim"]) for r in children) == POINTS  # each point once

    said.append(run("analysis.report", "--run", parent.info.run_id, "--tracking-uri", server.url,
                    "--out", str(tmp_path / "report"), cwd=tmp_path / "cwd", env=env))
    assert said[-1].returncode == 0, said[-1].stderr[-3000:]
    assert (tmp_path / "report" / "index.html").is_file()

    for result in said:
        assert PASSWORD not in result.stdout and PASSWORD not in result.stderr, " ".join(result.args[:4])
    for record in server.admin.search_runs([experiment.experiment_id], max_results=1000):
        assert PASSWORD not in repr(record.data.params) + repr(record.data.tags), record.info.run_id
    downloaded = tmp_path / "downloaded"
    for record in runs:
        server.admin.download_artifacts(record.info.run_id, "", str(downloaded / record.info.run_id))
    names = {path.name for path in downloaded.rglob("*")}
    assert {"config.yaml", "study.yaml", "summary.json"} <= names, sorted(names)
    assert files_holding(PASSWORD, downloaded, tmp_path / "report", tmp_path / "cwd",
                         server.folder / "artifacts", server.folder / "mlflow.db") == []
