"""The MLflow store: a new SQLite store starts from an empty-store template, as MLflow would make it."""

import sqlite3
import threading

from mlflow.tracking import MlflowClient

from vae_lab.tracking import prepare_store


def _schema(database):
    with sqlite3.connect(database) as connection:
        tables = sorted(row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'"))
        revision = connection.execute("SELECT version_num FROM alembic_version").fetchall()
    return tables, revision


def test_a_new_store_from_the_template_matches_one_mlflow_makes(tmp_path):
    by_mlflow = tmp_path / "plain" / "mlflow.db"
    by_mlflow.parent.mkdir()
    MlflowClient(f"sqlite:///{by_mlflow}").search_experiments()
    ours = tmp_path / "ours" / "mlflow.db"
    prepare_store(f"sqlite:///{ours}")
    assert ours.exists() and _schema(ours) == _schema(by_mlflow)

    client = MlflowClient(f"sqlite:///{ours}")
    assert [experiment.name for experiment in client.search_experiments()] == ["Default"]  # its own, made on open
    run = client.create_run(client.create_experiment("x", artifact_location=str(tmp_path / "artifacts")))
    client.log_metric(run.info.run_id, "m", 2.0)
    assert client.get_run(run.info.run_id).data.metrics == {"m": 2.0}

    prepare_store(f"sqlite:///{ours}")  # an existing store is left alone
    assert MlflowClient(f"sqlite:///{ours}").get_run(run.info.run_id).data.metrics == {"m": 2.0}


def test_concurrent_creators_of_one_store_get_one_store(tmp_path):
    database = tmp_path / "race" / "mlflow.db"
    errors = []

    def create():
        try:
            prepare_store(f"sqlite:///{database}")
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert [path.name for path in database.parent.iterdir()] == ["mlflow.db"]  # no drafts left behind
    assert MlflowClient(f"sqlite:///{database}").search_experiments()[0].name == "Default"
