"""MLflow: where the store is, one run's lifecycle, batched metric logging, model logging.

Runs are driven through `MlflowClient` with explicit run ids (no thread-local active run),
so a sweep can hold a parent run open while its children come and go, in any thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
import uuid
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from vae_lab import names
from vae_lab.config import Config, config_from_flat, parse_yaml

MAX_METRICS_PER_BATCH = 1000
STORE_PATIENCE_SECONDS = 300  # how long a run keeps training while its store cannot be reached
MAX_PARAMS_PER_BATCH = 100
from vae_lab.names import CHECKPOINT_DIR, CONFIG_ARTIFACT, MODEL_ARTIFACT, STATE_DICT_ARTIFACT  # noqa: E402


def project_root() -> Path:
    """The checkout this package lives in (when installed editable), else the current folder."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file():
        return checkout
    return Path.cwd().resolve()


def default_store_dir() -> Path:
    return project_root() / "mlruns"


def default_tracking_uri() -> str:
    """An absolute SQLite URI in mlruns/ (MLflow's own default is relative to the cwd)."""
    return f"sqlite:///{default_store_dir() / 'mlflow.db'}"


def resolve_tracking_uri(configured: str = "") -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def _local_artifact_root(tracking_uri: str) -> str | None:
    """For an SQLite store, artifacts go in an `artifacts/` folder beside the database."""
    if tracking_uri.startswith("sqlite:///"):
        database = Path(tracking_uri[len("sqlite:///"):])
        return (database.parent / "artifacts").resolve().as_uri()
    return None


def prepare_store(tracking_uri: str) -> None:
    """Make a new SQLite store's folder, and its database from an empty-store template."""
    if tracking_uri.startswith("sqlite:///"):
        database = Path(tracking_uri[len("sqlite:///"):])
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
        MlflowClient(tracking_uri=f"sqlite:///{draft}").search_experiments(max_results=1)
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
            client.set_experiment_tag(experiment.experiment_id, names.EXPERIMENT_KIND_TAG, names.EXPERIMENT_KIND)
        return experiment.experiment_id
    artifact_root = _local_artifact_root(tracking_uri)
    location = f"{artifact_root}/{name}" if artifact_root else None
    try:
        return client.create_experiment(name, artifact_location=location,
                                        tags={names.EXPERIMENT_KIND_TAG: names.EXPERIMENT_KIND})
    except mlflow.exceptions.MlflowException:
        # another worker created it between our lookup and our create
        return client.get_experiment_by_name(name).experiment_id


UI_ADDRESS = "http://127.0.0.1:5000"  # where `mlflow ui` serves unless told otherwise


def ui_links(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> list[str]:
    """Links that open MLflow's UI in model-training mode on the experiment's runs (and on one run):
    on the tracking server itself, or on what `mlflow ui` serves for a local store. No credentials."""
    from urllib.parse import urlsplit, urlunsplit

    base = UI_ADDRESS
    if tracking_uri.startswith(("http://", "https://")):
        parts = urlsplit(tracking_uri)
        base = urlunsplit((parts.scheme, parts.hostname + (f":{parts.port}" if parts.port else ""),
                           parts.path.rstrip("/"), "", ""))
    links = [f"{base}/#/experiments/{experiment_id}?{names.UI_WORKFLOW}"]
    if run_id:
        links.append(f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{names.UI_WORKFLOW}")
    return links


def browse_lines(tracking_uri: str, experiment_id: str, run_id: str, run_words: str) -> list[str]:
    """What a command prints so a person can look at its runs in MLflow's UI."""
    experiment_link, run_link = ui_links(tracking_uri, experiment_id, run_id)
    serve = [] if tracking_uri.startswith(("http://", "https://")) else \
        [("browse", f"mlflow ui --backend-store-uri {tracking_uri}   (then open the links below)")]
    return [f"  {label + ':':9}{text}" for label, text in [*serve, ("runs", experiment_link), (run_words, run_link)]]


def dataset_inputs(data) -> list:
    """MLflow dataset inputs of each split of `data` (vae_lab.data.ImageData): name, digest, source
    and shape, with the split as its context. Computed once per data object."""
    if "mlflow_datasets" not in data.derived:
        import json

        import mlflow.data
        from mlflow.data.dataset_source_registry import get_dataset_source_from_json
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        # from its JSON: MLflow registers its local source twice, and resolving a path warns about it
        source = get_dataset_source_from_json(json.dumps({"uri": data.source or data.name}), "local")
        inputs = []
        for split, context in names.DATASET_CONTEXTS.items():
            if split == "val" and not data.has_val:
                continue
            images, labels = data.split(split)
            dataset = mlflow.data.from_numpy(images.cpu().numpy(), targets=labels.cpu().numpy(),
                                             source=source, name=data.name)
            inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
        data.derived["mlflow_datasets"] = inputs
    return data.derived["mlflow_datasets"]


def git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_root(), capture_output=True,
                                text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def source_tags() -> dict[str, str]:
    """MLflow's own source tags (the UI's Source column): the command that made the run, and the commit."""
    import sys

    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    command = f"python -m {spec.name}" if spec is not None and spec.name else Path(sys.argv[0] or "python").name
    tags = {"mlflow.source.name": command, "mlflow.source.type": "LOCAL"}
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    return tags


def environment_tags(device: torch.device) -> dict[str, str]:
    tags = {
        "device": str(device),
        "torch_version": torch.__version__,
        "mlflow_version": mlflow.__version__,
        **source_tags(),
    }
    if device.type == "cuda":
        tags["device_name"] = torch.cuda.get_device_name(device)
    return tags


def _param_value(value: Any) -> str:
    return str(value)[:6000]


class StoreUnavailable(RuntimeError):
    """The tracking store stayed unreachable: the run stops, resumable from its checkpoint."""


def is_store_error(error: BaseException) -> bool:
    """Did `error` come from a store that could not be reached (rather than from a refusal)?"""
    import requests
    import sqlalchemy.exc

    if isinstance(error, (StoreUnavailable, requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                          ConnectionError, TimeoutError, sqlalchemy.exc.OperationalError)):
        return True
    message = str(error)
    return isinstance(error, mlflow.exceptions.MlflowException) and (
        "Max retries exceeded" in message or "Connection refused" in message or "timed out" in message)


class RunTracker:
    """One MLflow run: params, buffered metrics, artifacts, model, and its final status."""

    def __init__(self, client: MlflowClient, tracking_uri: str, run_id: str, experiment_id: str):
        self.client = client
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.experiment_id = experiment_id
        self._pending: list[Metric] = []
        self._system_monitor = None
        self._logged: set[tuple] | None = None  # (key, step, value) a resumed run already holds
        self._failing_since: float | None = None
        self._checkpointed = False
        self.ended = False

    @classmethod
    def start(cls, config: Config, device: torch.device, parent_run_id: str | None = None,
              run_name: str | None = None, tags: dict[str, str] | None = None) -> "RunTracker":
        tracking_uri = resolve_tracking_uri(config.tracking.uri)
        prepare_store(tracking_uri)
        client = MlflowClient(tracking_uri=tracking_uri)
        experiment_id = get_or_create_experiment(client, config.tracking.experiment, tracking_uri)
        all_tags = environment_tags(device)
        all_tags.update({"model": config.model.name, "dataset": config.data.name})
        all_tags.update(tags or {})
        if parent_run_id:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        # MLflow draws its random names from `random`, which the run has just seeded: every run would
        # get the same name. os.urandom is not seeded.
        name = run_name or config.tracking.run_name or f"{config.model.name}-{uuid.uuid4().hex[:6]}"
        run = client.create_run(experiment_id, run_name=name, tags=all_tags)
        tracker = cls(client, tracking_uri, run.info.run_id, experiment_id)
        tracker.log_params(config.flat())
        if config.train.checkpoint_every:  # what `--resume` and a study's next worker rebuild it from
            client.log_text(tracker.run_id, config.to_yaml(), CONFIG_ARTIFACT)
        tracker.monitor_system(config.tracking.system_metrics_every)
        return tracker

    @classmethod
    def resume(cls, config: Config, run_id: str, tags: dict[str, str] | None = None,
               checkpoint=None) -> "RunTracker":
        """Continue run `run_id` (RUNNING again). Metrics it already holds are not sent twice;
        those its checkpoint buffered are sent now, in case the store never got them."""
        tracking_uri = resolve_tracking_uri(config.tracking.uri)
        client = MlflowClient(tracking_uri=tracking_uri)
        run = client.get_run(run_id)
        tracker = cls(client, tracking_uri, run_id, run.info.experiment_id)
        tracker._logged = {(metric.key, metric.step, metric.value) for key in run.data.metrics
                           for metric in client.get_metric_history(run_id, key)}
        tracker._checkpointed = checkpoint is not None
        client.update_run(run_id, status="RUNNING")
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            client.delete_tag(run_id, names.FAILURE_REASON_TAG)
        tracker.set_tags({**(tags or {}), names.RESUMED_FROM_TAG: checkpoint.epoch if checkpoint else 0})
        if checkpoint is not None:
            tracker._pending = [Metric(key, float(value), int(timestamp), int(step))
                                for key, value, timestamp, step in checkpoint.pending_metrics]
            tracker.flush()
        tracker.monitor_system(config.tracking.system_metrics_every, resume=True)
        return tracker

    def monitor_system(self, every_seconds: float, resume: bool = False) -> None:
        """MLflow's system metrics (system/cpu_utilization_percentage, system/system_memory_usage_megabytes,
        and system/gpu_* where pynvml finds an NVIDIA GPU) on this run, every `every_seconds`; 0 = none."""
        if not every_seconds:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # not two INFO lines per trial
        self._system_monitor = SystemMetricsMonitor(self.run_id, sampling_interval=every_seconds,
                                                    resume_logging=resume, tracking_uri=self.tracking_uri)
        self._system_monitor.start()

    def log_datasets(self, data) -> None:
        """The run's train, validation and test data as MLflow dataset inputs (the UI's Dataset column)."""
        self.client.log_inputs(self.run_id, datasets=dataset_inputs(data))

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(key, _param_value(value)) for key, value in params.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[start:start + MAX_PARAMS_PER_BATCH])

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Buffered: nothing reaches the store until `flush()` (called once per epoch)."""
        timestamp = int(time.time() * 1000)
        self._pending.extend(Metric(key, float(value), timestamp, step) for key, value in metrics.items())

    def pending(self) -> list[list]:
        """The buffered metrics as [key, value, timestamp, step] (what a checkpoint keeps)."""
        return [[metric.key, metric.value, metric.timestamp, metric.step] for metric in self._pending]

    def flush(self) -> None:
        """Send the buffered metrics; they stay buffered if the store cannot take them."""
        pending = self._pending
        if self._logged is not None:
            pending = [metric for metric in pending if (metric.key, metric.step, metric.value) not in self._logged]
        for start in range(0, len(pending), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=pending[start:start + MAX_METRICS_PER_BATCH])
        self._pending = []

    def attempt(self, action, what: str) -> bool:
        """Run a store call that may wait: False while the store cannot be reached (training goes
        on and the call is made again later), StoreUnavailable once that has lasted
        STORE_PATIENCE_SECONDS."""
        try:
            action()
        except Exception as error:
            if not is_store_error(error):
                raise
            now = time.time()
            if self._failing_since is None:
                self._failing_since = now
                logging.getLogger(__name__).warning("run %s: could not save %s, will retry: %s",
                                                    self.run_id, what, str(error).splitlines()[0][:200])
            if now - self._failing_since > STORE_PATIENCE_SECONDS:
                raise StoreUnavailable(f"the tracking store {self.tracking_uri} has been unreachable for "
                                       f"{now - self._failing_since:.0f} s; rerun to continue from the last "
                                       "checkpoint") from error
            return False
        self._failing_since = None
        return True

    def log_artifact(self, local_path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)
        if artifact_path == CHECKPOINT_DIR:
            self._checkpointed = True

    def log_artifacts(self, local_dir: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def finish_with_model(self, model: "torch.nn.Module") -> None:
        """Log the model and end the run FINISHED.

        The model goes in twice: as an MLflow pytorch model in pickle format (so
        `mlflow.pytorch.load_model` gives back the class with `encode`/`decode`/`sample`;
        the default `pt2` format would give a bare graph), and as a plain state dict that
        `load_logged_model` reads with `torch.load(weights_only=True)`.
        `mlflow.pytorch.log_model` only logs into the active run, so the run is made
        active for it; leaving that block is what marks the run FINISHED.
        """
        self.flush()
        model = model.to("cpu")
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = Path(folder) / "state_dict.pt"
            torch.save({"state_dict": model.state_dict(), "image_shape": list(model.image_shape)}, checkpoint)
            self.client.log_artifact(self.run_id, str(checkpoint), "model_state")
        mlflow.set_tracking_uri(self.tracking_uri)
        # MLflow warns about pickle on every call; the state dict above is the safe copy
        logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
        _skip_requirement_scan()
        with mlflow.start_run(run_id=self.run_id):
            mlflow.pytorch.log_model(
                model, name=MODEL_ARTIFACT, serialization_format="pickle",
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                code_paths=[str(Path(__file__).resolve().parents[1])],
            )
        self.ended = True
        self._finished()

    def end(self, status: str = "FINISHED", reason: str | None = None, resumable: bool = False) -> None:
        """End the run with `status`. A `resumable` end (an interrupt) of a run with a checkpoint
        drops the metrics buffered since that checkpoint: continuing the run logs them again.
        A store that cannot be reached leaves the run RUNNING (a study's next worker sees its
        heartbeat stop and continues it from its checkpoint)."""
        if self.ended:
            return
        if self._system_monitor is not None:
            self._system_monitor.finish()
            self._system_monitor = None
        if resumable and self._checkpointed:
            self._pending = []
        try:
            self.flush()
            if reason:
                self.set_tags({names.FAILURE_REASON_TAG: reason[:5000]})
            self.client.set_terminated(self.run_id, status=status)
        except Exception as error:
            if status == "FINISHED" or not is_store_error(error):
                raise
            logging.getLogger(__name__).warning("run %s could not be marked %s: %s", self.run_id, status,
                                                str(error).splitlines()[0][:200])
        self.ended = True
        if status == "FINISHED":
            self._finished()

    def _finished(self) -> None:
        if self._checkpointed:  # a finished run keeps its model, not its training state
            delete_checkpoints(self.client, self.run_id)


def _skip_requirement_scan() -> None:
    """Before logging a model MLflow maps every installed distribution to its modules (about
    0.9 s per process, most of a model's logging time) only to warn when the requirements we
    pass (this process's own torch and mlflow versions) do not match this process, which they
    cannot. An empty map makes it look versions up by package name instead. MLflow keeps the
    map in a private module global; if that changes, this does nothing and the scan runs."""
    from mlflow.utils import requirements_utils

    if getattr(requirements_utils, "_MODULES_TO_PACKAGES", {}) is None:
        requirements_utils._MODULES_TO_PACKAGES = {}


class NullTracker:
    """Tracking off: the same calls, no store."""

    run_id = None

    def log_params(self, params): pass
    def log_datasets(self, data): pass
    def set_tags(self, tags): pass
    def log_metrics(self, metrics, step): pass
    def pending(self): return []
    def attempt(self, action, what): return True
    def flush(self): pass
    def log_artifacts(self, local_dir, artifact_path=None): pass
    def finish_with_model(self, model): pass
    def end(self, status="FINISHED", reason=None, resumable=False): pass


def missing_store(tracking_uri: str) -> str | None:
    """Why an SQLite store cannot be read, or None (opening a missing one would create it)."""
    if tracking_uri.startswith("sqlite:///"):
        database = Path(tracking_uri[len("sqlite:///"):])
        if not database.is_file():
            return f"no MLflow store at {database}; train a model first (python -m vae_lab.train) " \
                   "or pass --tracking-uri"
    return None


class StudyNotFound(LookupError):
    """A study named on a command line is not there, or not one study; the message is one line."""


def find_study(client: MlflowClient, study: str):
    """The parent run of a study given by its parent run id or its name (`vae_lab.study_name`).
    A name that several parent runs carry (a `--new-study` restart) is ambiguous: their ids are listed."""
    from mlflow.exceptions import MlflowException

    try:
        parent = client.get_run(study)
    except MlflowException:
        if "'" in study:  # it cannot be quoted in MLflow's filter language, and no study name has one
            raise StudyNotFound(f"no study named {study!r} and no run with that id in {client.tracking_uri}") from None
        parents = client.search_runs(
            [experiment.experiment_id for experiment in client.search_experiments()],
            filter_string=f"tags.`{names.ROLE_TAG}` = 'study' and tags.`{names.STUDY_NAME_TAG}` = '{study}'",
            order_by=["attributes.start_time DESC"], max_results=10)
        if not parents:
            raise StudyNotFound(f"no study named {study!r} and no run with that id in {client.tracking_uri}") from None
        if len(parents) > 1:
            raise StudyNotFound(f"{len(parents)} studies are named {study!r} (parent runs "
                                f"{', '.join(run.info.run_id for run in parents)}); pass the parent run id") from None
        parent = parents[0]
    if parent.data.tags.get(names.ROLE_TAG) != "study":
        raise StudyNotFound(f"run {parent.info.run_id} is not a study's parent run")
    return parent


def has_logged_model(client: MlflowClient, run_id: str) -> bool:
    """Did the run log its state dict (what `load_logged_model` reads)?"""
    try:
        listed = client.list_artifacts(run_id, STATE_DICT_ARTIFACT.rsplit("/", 1)[0])
    except (mlflow.exceptions.MlflowException, OSError):  # artifact store unreachable or gone
        return False
    return STATE_DICT_ARTIFACT in {item.path for item in listed}


def load_run_config(client: MlflowClient, run_id: str) -> Config:
    """The config a run trained with (its config.yaml). Keys added since are filled with the
    value that reproduces what the run did (a run from before validation splits had none)."""
    with tempfile.TemporaryDirectory() as folder:
        path = client.download_artifacts(run_id, CONFIG_ARTIFACT, folder)
        from vae_lab.config import flatten

        flat = flatten(parse_yaml(Path(path).read_text()))
        flat.setdefault("data.val_size", 0)
        return config_from_flat(flat)


def load_logged_model(run_id: str, tracking_uri: str | None = None,
                      map_location: str | torch.device = "cpu", config: Config | None = None):
    """Rebuild a run's model from its config (read from the run unless given) and its state
    dict (`torch.load(weights_only=True)`)."""
    from vae_lab.models.autoencoders import build_model

    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri or ""))
    config = config or load_run_config(client, run_id)
    with tempfile.TemporaryDirectory() as folder:
        path = client.download_artifacts(run_id, STATE_DICT_ARTIFACT, folder)
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    model = build_model(config.model, tuple(checkpoint["image_shape"]))
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:  # e.g. a conv model from before the kernel-4 decoder
        raise IncompatibleModel(
            f"run {run_id}'s {config.model.name} was logged by an older vae_lab whose layers differ from "
            f"today's ({str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else error}); "
            "train it again to use it here") from None
    return model.eval(), config


class IncompatibleModel(ValueError):
    """A logged state dict that today's model of its config cannot hold; the message is one line."""


def delete_checkpoints(client, run_id: str) -> None:
    """Remove the run's checkpoints (best effort: a store that cannot delete keeps them)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        artifact_uri = client.get_run(run_id).info.artifact_uri
        get_artifact_repository(artifact_uri, tracking_uri=client.tracking_uri).delete_artifacts(CHECKPOINT_DIR)
    except Exception:
        pass
