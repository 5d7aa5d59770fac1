"""A store made ready for runs: a new SQLite store's folder and tables, and the experiment,
tagged so that MLflow's UI opens it on its runs."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from vae_lab import names
from vae_lab.tracking.errors import again_if_duplicate_row
from vae_lab.tracking.uris import SQLITE_PREFIX, sqlite_path


def _local_artifact_root(tracking_uri: str) -> str | None:
    """For an SQLite store, artifacts go in an `artifacts/` folder beside the database."""
    database = sqlite_path(tracking_uri)
    if database is not None:
        return (database.parent / "artifacts").resolve().as_uri()
    return None


def prepare_store(tracking_uri: str) -> None:
    """Make a new SQLite store's folder, and its database from an empty-store template."""
    database = sqlite_path(tracking_uri)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
        if not database.exists():
            _copy_empty_store(database)


def _empty_store_template() -> Path:
    """An SQLite database that MLflow created and migrated, with no experiment in it, made once
    per MLflow version in ~/.cache/vae_lab. A new store copied from it skips MLflow's schema
    migrations (about 1.5 s of every fresh store; MLflow still checks the schema and creates
    the store's own Default experiment)."""
    import sqlite3

    folder = Path.home() / ".cache" / "vae_lab"
    template = folder / f"empty-mlflow-{mlflow.__version__}.db"
    if template.exists():
        return template
    folder.mkdir(parents=True, exist_ok=True)
    draft = folder / f".{template.name}.{uuid.uuid4().hex}"
    try:
        MlflowClient(tracking_uri=f"{SQLITE_PREFIX}{draft}").search_experiments(max_results=1)
        with contextlib.closing(sqlite3.connect(draft)) as connection, connection:
            connection.execute("DELETE FROM experiments WHERE experiment_id = 0")
        os.replace(draft, template)  # atomic; two makers write equal files
    finally:
        draft.unlink(missing_ok=True)
    return template


def _copy_empty_store(database: Path) -> None:
    import shutil

    try:
        template = _empty_store_template()
    except Exception:  # no writable cache, an MLflow that refuses: let MLflow create the store
        return
    draft = database.with_name(f".{database.name}.{uuid.uuid4().hex}")
    try:
        shutil.copyfile(template, draft)
        os.link(draft, database)  # never replaces a store another process made meanwhile
    except FileExistsError:
        pass
    finally:
        draft.unlink(missing_ok=True)


def get_or_create_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """The experiment's id, created (or restored) when needed, tagged as model development so
    that MLflow's UI opens it on its runs."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        if experiment.tags.get(names.EXPERIMENT_KIND_TAG) != names.EXPERIMENT_KIND:  # made by an older vae_lab
            # another worker may be tagging it at the same moment
            again_if_duplicate_row(lambda: client.set_experiment_tag(
                experiment.experiment_id, names.EXPERIMENT_KIND_TAG, names.EXPERIMENT_KIND))
        return experiment.experiment_id
    artifact_root = _local_artifact_root(tracking_uri)
    location = f"{artifact_root}/{name}" if artifact_root else None
    try:
        return client.create_experiment(name, artifact_location=location,
                                        tags={names.EXPERIMENT_KIND_TAG: names.EXPERIMENT_KIND})
    except mlflow.exceptions.MlflowException:
        # another worker created it between our lookup and our create
        return client.get_experiment_by_name(name).experiment_id
