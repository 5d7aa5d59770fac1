"""Every use of an MLflow name that is not public API, in one place. Each has a test in
tests/test_mlflow_compat.py that fails loudly when an MLflow release changes it; at run time
each degrades to MLflow's own behaviour (slower, or a warning) rather than failing a run.
"""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from pathlib import Path


def local_dataset_source(uri: str):
    """A local dataset source for `uri`. Built from its JSON: MLflow registers its local source
    twice, and resolving a path through the public `resolve_dataset_source` warns about it."""
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json

    return get_dataset_source_from_json(json.dumps({"uri": uri}), "local")


def dataset_entity(dataset):
    """The entity `MlflowClient.log_inputs` takes for an `mlflow.data` dataset (the public path,
    `mlflow.log_input`, needs an active run, which vae_lab never holds)."""
    return dataset._to_mlflow_entity()


def start_system_metrics(run_id: str, every_seconds: float, resume: bool, tracking_uri: str):
    """MLflow's system-metrics monitor on a run given by id (the public switch,
    `start_run(log_system_metrics=True)`, needs an active run); returns it started."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=every_seconds, resume_logging=resume,
                                   tracking_uri=tracking_uri)
    monitor.start()
    return monitor


def delete_artifacts(client, run_id: str, path: str, artifact_uri: str | None = None) -> None:
    """Delete a folder of a run's artifacts (MlflowClient has no call for it); `artifact_uri`, the
    run's, when the caller knows it (else it is read from the run)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    artifact_uri = artifact_uri or client.get_run(run_id).info.artifact_uri
    get_artifact_repository(artifact_uri, tracking_uri=client.tracking_uri).delete_artifacts(path)


def local_artifact_folder(artifact_uri: str | None) -> Path | None:
    """The folder holding a run's artifacts where its artifact store is a local one (MLflow's
    LocalArtifactRepository, for plain paths and `file:` URIs, keeps artifact `a/b` at
    `<folder>/a/b`), else None (a server, a bucket: upload through MLflow)."""
    if not artifact_uri:
        return None
    parsed = urllib.parse.urlparse(artifact_uri)
    if parsed.scheme not in ("", "file") or parsed.netloc not in ("", "localhost"):
        return None
    return Path(urllib.request.url2pathname(parsed.path))


def skip_requirement_scan() -> None:
    """Before logging a model MLflow maps every installed distribution to its modules (about
    0.9 s per process, most of a model's logging time) only to warn when the requirements we
    pass (this process's own torch and mlflow versions) do not match this process, which they
    cannot. An empty map makes it look versions up by package name instead. MLflow keeps the
    map in a private module global; if that changes, this does nothing and the scan runs."""
    from mlflow.utils import requirements_utils

    if getattr(requirements_utils, "_MODULES_TO_PACKAGES", {}) is None:
        requirements_utils._MODULES_TO_PACKAGES = {}


def tracking_server_get(uri: str, endpoint: str, timeout: float, **params):
    """GET `endpoint` of the tracking server `uri` as MLflow's REST store sends its requests (the
    same credentials: user:password in the URI, $MLFLOW_TRACKING_USERNAME/PASSWORD, a token, its
    TLS settings), once: no retries. The requests.Response, whatever its status."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    return http_request(get_default_host_creds(uri), endpoint, "GET", max_retries=0, backoff_factor=0,
                        timeout=timeout, raise_on_status=False, params=params)
