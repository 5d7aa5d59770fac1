"""No secret leaves: a password in the tracking URI (or in PGPASSWORD, MLFLOW_TRACKING_PASSWORD)
reaches the server (as the client's credentials) and nothing else: not stdout or stderr, not a param, tag or artifact, not the report, not an HTTP
answer of the serve page. Against a real `mlflow server`, through the real commands."""

import os
import subprocess
import sys
from pathlib import Path

import servers
from test_sweep import write_study
from vae_lab.serve.app import create_app

MARKER = "pw-MARKER-7f3a9c"
PYTHON = sys.executable


def run(command: list[str], env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run([PYTHON, "-m", *command], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def files_holding(marker: str, *places: Path) -> list[str]:
    files = [path for place in places for path in ([place] if place.is_file() else place.rglob("*"))]
    return [str(path) for path in files if path.is_file() and marker.encode() in path.read_bytes()]


def test_a_password_in_the_tracking_uri_appears_in_no_output_record_report_or_answer(tmp_path):
    server_db, artifacts = tmp_path / "server.db", tmp_path / "server-artifacts"
    with servers.mlflow_server(f"sqlite:///{server_db}", artifacts) as url:
        secret_uri = url.replace("http://", f"http://alice:{MARKER}@")
        # passwords in the environment too: PostgreSQL's, and MLflow's basic-auth pair
        env = {**os.environ, "MLFLOW_TRACKING_URI": secret_uri, "MLFLOW_DISABLE_TELEMETRY": "true",
               "PGPASSWORD": MARKER, "MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": MARKER}
        said = []
        # a run that checkpoints and logs its model
        said.append(run(["vae_lab.train", "data.name=digits", "train.epochs=1", "train.batch_size=64",
                         "train.checkpoint_every=1", "train.progress=false", "eval.iwae_samples=2",
                         f"tracking.uri={secret_uri}"], env))
        # a study, its base naming the store too (so the study file it logs carries the URI)
        study = write_study(tmp_path / "secret.yaml", "secret", {"model.latent_dim": [2, 3]},
                            **{"tracking.uri": secret_uri})
        said.append(run(["vae_lab.sweep", str(study), "--tracking-uri", secret_uri,
                         "--storage", f"journal:///{tmp_path / 'optuna.journal'}"], env))
        said.append(run(["vae_lab.sweep", str(study), "--dry-run", "--tracking-uri", secret_uri,
                         "--storage", f"journal:///{tmp_path / 'optuna.journal'}"], env))
        said.append(run(["analysis.report", "--experiment", "vae_lab", "--tracking-uri", secret_uri,
                         "--out", str(tmp_path / "report")], env))

        client = create_app(secret_uri).test_client()
        answers = [client.get(path) for path in
                   ("/api/runs", "/api/runs/deadbeef/prior.png", "/api/runs/deadbeef", "/prior.png?count=2")]
        assert answers[0].status_code == 200 and len(answers[0].get_json()) >= 1  # the store was reached
        assert answers[1].status_code == 404

    for result in said:
        assert MARKER not in result.stdout and MARKER not in result.stderr, " ".join(result.args[:4])
    for answer in answers:
        assert MARKER.encode() not in answer.get_data()
    assert files_holding(MARKER, server_db, artifacts, tmp_path / "report") == []
    assert (tmp_path / "report" / "index.html").is_file()
