"""Each private MLflow name vae_lab uses (vae_lab/tracking/mlflow_compat.py), against the real MLflow:
a release that renames or changes one fails here, by name, rather than somewhere in a run."""

import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import DatasetInput, InputTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils import requirements_utils

from servers import answering_server
from vae_lab.tracking import mlflow_compat
from vae_lab.tracking.stores import get_or_create_experiment, prepare_store


def new_run(tracking_uri: str) -> tuple[MlflowClient, str]:
    prepare_store(tracking_uri)
    client = MlflowClient(tracking_uri)
    return client, client.create_run(get_or_create_experiment(client, "compat", tracking_uri)).info.run_id


def test_a_numpy_dataset_becomes_an_input_the_client_logs_by_run_id(tracking_uri, tmp_path):
    import mlflow.data

    source = mlflow_compat.local_dataset_source(str(tmp_path / "images"))
    assert source.uri == str(tmp_path / "images")
    dataset = mlflow.data.from_numpy(np.zeros((3, 1, 2, 2), dtype=np.uint8), targets=np.arange(3),
                                     source=source, name="tiny")
    entity = mlflow_compat.dataset_entity(dataset)
    assert entity.name == "tiny" and entity.digest == dataset.digest
    client, run_id = new_run(tracking_uri)
    client.log_inputs(run_id, datasets=[DatasetInput(entity, tags=[InputTag("mlflow.data.context", "train")])])
    (logged,) = client.get_run(run_id).inputs.dataset_inputs
    assert logged.dataset.name == "tiny" and logged.dataset.source == entity.source


def test_deleting_an_artifact_folder_of_a_run(tracking_uri, tmp_path):
    client, run_id = new_run(tracking_uri)
    for name in ("a.pt", "b.pt"):
        (tmp_path / name).write_text(name)
        client.log_artifact(run_id, str(tmp_path / name), "checkpoint")
    (tmp_path / "kept.txt").write_text("kept")
    client.log_artifact(run_id, str(tmp_path / "kept.txt"))
    assert len(client.list_artifacts(run_id, "checkpoint")) == 2
    mlflow_compat.delete_artifacts(client, run_id, "checkpoint")
    assert client.list_artifacts(run_id, "checkpoint") == []
    assert [item.path for item in client.list_artifacts(run_id)] == ["kept.txt"]
    client.log_artifact(run_id, str(tmp_path / "a.pt"), "best")  # the run's artifact URI given, as a tracker knows it
    mlflow_compat.delete_artifacts(client, run_id, "best", client.get_run(run_id).info.artifact_uri)
    assert [item.path for item in client.list_artifacts(run_id)] == ["kept.txt"]


def test_a_local_artifact_folder_is_where_mlflow_keeps_a_run_s_artifacts(tracking_uri, tmp_path):
    """Checkpoints are written straight into it (`RunTracker.write_artifact`): MLflow must list and
    download them as its own."""
    client, run_id = new_run(tracking_uri)
    (tmp_path / "a.pt").write_text("through MLflow")
    client.log_artifact(run_id, str(tmp_path / "a.pt"), "checkpoint")
    folder = mlflow_compat.local_artifact_folder(client.get_run(run_id).info.artifact_uri)
    assert (folder / "checkpoint" / "a.pt").read_text() == "through MLflow"
    (folder / "checkpoint" / "b.pt").write_text("beside it")
    assert sorted(item.path for item in client.list_artifacts(run_id, "checkpoint")) == ["checkpoint/a.pt",
                                                                                         "checkpoint/b.pt"]
    assert Path(client.download_artifacts(run_id, "checkpoint/b.pt", str(tmp_path))).read_text() == "beside it"
    for remote in ("mlflow-artifacts:/1/abc/artifacts", "s3://bucket/1/abc/artifacts", "file://otherhost/x", None):
        assert mlflow_compat.local_artifact_folder(remote) is None


def test_system_metrics_monitor_logs_into_a_run_given_by_id(tracking_uri):
    client, run_id = new_run(tracking_uri)
    monitor = mlflow_compat.start_system_metrics(run_id, every_seconds=0.2, resume=False, tracking_uri=tracking_uri)
    deadline = time.time() + 30
    while time.time() < deadline and "system/cpu_utilization_percentage" not in client.get_run(run_id).data.metrics:
        time.sleep(0.2)
    monitor.finish()
    assert "system/cpu_utilization_percentage" in client.get_run(run_id).data.metrics


def test_the_requirement_scan_map_is_the_module_global_mlflow_reads(monkeypatch):
    # MLflow fills `_MODULES_TO_PACKAGES` lazily (None until the first model is logged); an empty
    # dict in its place is what makes it skip the scan
    assert hasattr(requirements_utils, "_MODULES_TO_PACKAGES"), "MLflow moved its module-to-package map"
    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", None)
    mlflow_compat.skip_requirement_scan()
    assert requirements_utils._MODULES_TO_PACKAGES == {}
    requirements_utils._init_modules_to_packages_map()  # what logging a model calls first
    assert requirements_utils._MODULES_TO_PACKAGES == {}, "MLflow scanned the installed packages anyway"


def test_a_tracking_server_request_carries_the_credentials_mlflow_client_sends(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "from-env")
    with answering_server(lambda path: 401) as (url, sent):
        for uri in (url, url.replace("http://", "http://bob:from-uri@")):
            sent.clear()
            response = mlflow_compat.tracking_server_get(uri, "/api/2.0/mlflow/experiments/search", 5, max_results=1)
            assert response.status_code == 401
            with pytest.raises(MlflowException):
                MlflowClient(uri).search_experiments(max_results=1)
            ours, the_clients = sent
            assert ours is not None and ours == the_clients, uri
