"""One MLflow run from start to end: params, buffered metrics, artifacts, the model, its status.

Runs are driven through `MlflowClient` with explicit run ids (no thread-local active run),
so a sweep can hold a parent run open while its children come and go, in any thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.entities import LoggedModelOutput, Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from vae_lab import names
from vae_lab.components import component_files, short_name
from vae_lab.config import Config
from vae_lab.files import replace_whole
from vae_lab.interrupts import deferring
from vae_lab.names import CHECKPOINT_DIR, CONFIG_ARTIFACT, MODEL_ARTIFACT
from vae_lab.tracking import mlflow_compat
from vae_lab.tracking.errors import (StoreUnavailable, again_if_duplicate_row, describe, is_store_error,
                                     store_patience_seconds)
from vae_lab.tracking.provenance import dataset_inputs, environment_tags
from vae_lab.tracking.stores import get_or_create_experiment, prepare_store
from vae_lab.tracking.uris import redact, resolve_tracking_uri

# what one log_batch request may carry (MLflow's limits): metrics, params and tags in all; of them, tags
MAX_ENTITIES_PER_BATCH, MAX_TAGS_PER_BATCH = 1000, 100
MAX_PARAMS_PER_BATCH = 100
# the part of the package that unpickling and running a logged model imports: what its MLflow
# model carries as code (tests/test_train.py loads one where vae_lab comes only from there)
MODEL_CODE = ("__init__.py", "config.py", "components.py", "names.py", "data", "models")


_model_code: dict[int, tempfile.TemporaryDirectory] = {}  # by process id: a forked worker makes its own


def model_code() -> str:
    """A folder `vae_lab` holding MODEL_CODE, made once per process and removed when it exits
    (the MLflow model of every run copies it: a quarter of the package's files)."""
    package = Path(__file__).resolve().parents[1]
    folder = _model_code.get(os.getpid())
    if folder is None:
        folder = _model_code[os.getpid()] = tempfile.TemporaryDirectory(prefix="vae_lab_model_code_")
        for name in MODEL_CODE:
            source, target = package / name, Path(folder.name) / package.name / name
            if source.is_dir():
                shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.parent.mkdir(exist_ok=True)
                shutil.copy2(source, target)
    return str(Path(folder.name) / package.name)


def config_for_the_record(config: Config) -> Config:
    """The config as a run records it (params, config.yaml): its tracking URI without a password.
    Whoever rebuilds a run from its record names the store again (`--resume`, a study's retry)."""
    return dataclasses.replace(config, tracking=dataclasses.replace(config.tracking, uri=redact(config.tracking.uri)))


def _param_value(value: Any) -> str:
    return str(value)[:6000]


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    """Params on run `run_id`, in MLflow's batches of at most MAX_PARAMS_PER_BATCH."""
    items = [Param(key, _param_value(value)) for key, value in params.items()]
    for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[start:start + MAX_PARAMS_PER_BATCH])


class RunTracker:
    """One MLflow run: params, buffered metrics, artifacts, model, and its final status."""

    def __init__(self, client: MlflowClient, tracking_uri: str, run_id: str, experiment_id: str,
                 artifact_uri: str | None = None):
        self.client = client
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.artifact_uri = artifact_uri
        self._pending: list[Metric] = []
        self._pending_tags: dict[str, str] = {}
        self._system_monitor = None
        self._logged: set[tuple] | None = None  # (key, step, value) a resumed run already holds
        self._failing_since: float | None = None
        self._checkpointed = False
        self._params: dict[str, str] | None = None  # as logged, for the MLflow model (None: read from the run)
        self.ended = False

    @classmethod
    @deferring
    def start(cls, config: Config, device: torch.device, parent_run_id: str | None = None,
              run_name: str | None = None, tags: dict[str, str] | None = None) -> "RunTracker":
        tracking_uri = resolve_tracking_uri(config.tracking.uri)
        prepare_store(tracking_uri)
        client = MlflowClient(tracking_uri=tracking_uri)
        experiment_id = get_or_create_experiment(client, config.tracking.experiment, tracking_uri)
        all_tags = environment_tags(device)
        all_tags.update({names.MODEL_TAG: short_name(config.model.name), names.DATASET_TAG: config.data.name})
        all_tags.update(tags or {})
        if parent_run_id:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        # MLflow draws its random names from `random`, which the run has just seeded: every run would
        # get the same name. os.urandom is not seeded.
        name = run_name or config.tracking.run_name or f"{short_name(config.model.name)}-{uuid.uuid4().hex[:6]}"
        run = client.create_run(experiment_id, run_name=name, tags=all_tags)
        tracker = cls(client, tracking_uri, run.info.run_id, experiment_id, run.info.artifact_uri)
        recorded = config_for_the_record(config)
        tracker.log_params(recorded.flat())
        # what `--resume`, a study's next worker and vae_lab.evaluate rebuild the run from
        client.log_text(tracker.run_id, recorded.to_yaml(), CONFIG_ARTIFACT)
        for path in component_files(config):  # the code a user's component ran, kept with the run
            client.log_artifact(tracker.run_id, str(path), names.COMPONENTS_ARTIFACT_DIR)
        tracker.monitor_system(config.tracking.system_metrics_every)
        return tracker

    @classmethod
    @deferring
    def resume(cls, config: Config, run_id: str, tags: dict[str, str] | None = None,
               checkpoint=None) -> "RunTracker":
        """Continue run `run_id` (RUNNING again). Metrics it already holds are not sent twice;
        those its checkpoint buffered are sent now, in case the store never got them."""
        tracking_uri = resolve_tracking_uri(config.tracking.uri)
        client = MlflowClient(tracking_uri=tracking_uri)
        run = client.get_run(run_id)
        tracker = cls(client, tracking_uri, run_id, run.info.experiment_id, run.info.artifact_uri)
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
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # not two INFO lines per trial
        self._system_monitor = mlflow_compat.start_system_metrics(self.run_id, every_seconds, resume,
                                                                  self.tracking_uri)

    @deferring
    def log_datasets(self, data) -> None:
        """The run's train, validation and test data as MLflow dataset inputs (the UI's Dataset column),
        and its digest and source as tags (what `evaluate`, the report and serve check it against)."""
        inputs = dataset_inputs(data)
        # another worker may be logging the same new dataset at the same moment
        again_if_duplicate_row(lambda: self.client.log_inputs(self.run_id, datasets=inputs))
        tags = {names.DATASET_TAG: data.name, names.DATA_DIGEST_TAG: data.digest,
                names.DATA_SOURCE_TAG: data.source or data.name}
        if not data.labeled:
            tags[names.LABELS_TAG] = "none"
        self.client.log_batch(self.run_id, tags=[RunTag(key, value) for key, value in tags.items()])

    @deferring
    def log_params(self, params: dict[str, Any]) -> None:
        log_params(self.client, self.run_id, params)
        self._params = {**(self._params or {}), **{key: _param_value(value) for key, value in params.items()}}

    @deferring
    def set_tags(self, tags: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])

    def log_tags(self, tags: dict[str, Any]) -> None:
        """Buffered like metrics, and sent in the same request by `flush()`: at a run's end each
        request to a SQLite store is a transaction costing 10-15 ms. (`set_tags` sends at once.)"""
        self._pending_tags.update({key: str(value) for key, value in tags.items()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Buffered: nothing reaches the store until `flush()` (called once per epoch)."""
        timestamp = int(time.time() * 1000)
        self._pending.extend(Metric(key, float(value), timestamp, step) for key, value in metrics.items())

    def pending(self) -> list[list]:
        """The buffered metrics as [key, value, timestamp, step] (what a checkpoint keeps)."""
        return [[metric.key, metric.value, metric.timestamp, metric.step] for metric in self._pending]

    @deferring
    def flush(self) -> None:
        """Send the buffered metrics and tags; they stay buffered if the store cannot take them."""
        pending = self._pending
        if self._logged is not None:
            pending = [metric for metric in pending if (metric.key, metric.step, metric.value) not in self._logged]
        tags = [RunTag(key, value) for key, value in self._pending_tags.items()]
        while pending or tags:
            batch_tags, tags = tags[:MAX_TAGS_PER_BATCH], tags[MAX_TAGS_PER_BATCH:]
            room = MAX_ENTITIES_PER_BATCH - len(batch_tags)
            batch_metrics, pending = pending[:room], pending[room:]
            self.client.log_batch(self.run_id, metrics=batch_metrics, tags=batch_tags)
        self._pending = []
        self._pending_tags = {}

    def attempt(self, action, what: str) -> bool:
        """Run a store call that may wait: False while the store cannot be reached (training goes
        on and the call is made again later), StoreUnavailable once that has lasted
        `store_patience_seconds()` (300 s unless $VAE_LAB_STORE_PATIENCE_SECONDS says)."""
        try:
            action()
        except Exception as error:
            if not is_store_error(error):
                raise
            now = time.time()
            if self._failing_since is None:
                self._failing_since = now
                logging.getLogger(__name__).warning("run %s: could not save %s, will retry: %s",
                                                    self.run_id, what, describe(error))
            if now - self._failing_since > store_patience_seconds():
                raise StoreUnavailable(f"the tracking store {redact(self.tracking_uri)} has been unreachable for "
                                       f"{now - self._failing_since:.0f} s; rerun to continue from the last "
                                       "checkpoint") from error
            return False
        self._failing_since = None
        return True

    @deferring
    def write_artifact(self, data: bytes, artifact_path: str, name: str) -> None:
        """`data` as the run's artifact `artifact_path/name`. Where the run's artifacts are a
        local folder it is written there directly, to a temporary name and renamed (a reader
        sees the old file or the whole new one): a checkpoint was written once to a temporary
        file and once more by MLflow's copy, 9 ms each for an MLP's 5 MB. Elsewhere MLflow uploads it."""
        folder = mlflow_compat.local_artifact_folder(self.artifact_uri)
        if folder is not None:
            replace_whole(folder / artifact_path / name, lambda handle: handle.write(data))
        else:
            with tempfile.TemporaryDirectory() as staging:
                path = Path(staging) / name
                path.write_bytes(data)
                self.client.log_artifact(self.run_id, str(path), artifact_path)
        if artifact_path == CHECKPOINT_DIR:
            self._checkpointed = True

    @deferring
    def log_artifacts(self, local_dir: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    @deferring
    def finish_with_model(self, model: "torch.nn.Module") -> None:
        """Log the model and end the run FINISHED.

        The model goes in twice: as an MLflow pytorch model in pickle format (so
        `mlflow.pytorch.load_model` gives back the class with `encode`/`decode`/`sample`;
        the default `pt2` format would give a bare graph), and as a plain state dict that
        `load_logged_model` reads with `torch.load(weights_only=True)`.

        The MLflow model is made with its source run named but no run active, then linked to
        the run as its output: logged inside an active run, MLflow 3 re-reads the history of
        every metric of the run (one query or HTTP request per metric, ~40 here) to copy its
        step-0 values onto the model, which was 44% of the model's logging time. Instead the
        metrics still buffered (the end of run's: eval/*, test/*) go out once, carrying the
        model's id, so the model lists them as before.
        """
        params = self._params
        if params is None:  # a resumed run: its params are in the store
            params = dict(self.client.get_run(self.run_id).data.params)
        logged = self.client.create_logged_model(self.experiment_id, name=MODEL_ARTIFACT, source_run_id=self.run_id,
                                                 params=params)
        self._pending = [Metric(metric.key, metric.value, metric.timestamp, metric.step, run_id=self.run_id,
                                model_id=logged.model_id) for metric in self._pending]
        self.flush()
        model = model.to("cpu")
        state = io.BytesIO()
        torch.save({"state_dict": model.state_dict(), "image_shape": list(model.image_shape)}, state)
        self.write_artifact(state.getvalue(), "model_state", "state_dict.pt")
        mlflow.set_tracking_uri(self.tracking_uri)
        # MLflow warns about pickle on every call; the state dict above is the safe copy
        logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
        mlflow_compat.skip_requirement_scan()
        mlflow.pytorch.log_model(
            model, name=MODEL_ARTIFACT, model_id=logged.model_id, serialization_format="pickle",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            code_paths=[model_code()],
        )
        self.client.log_outputs(self.run_id, [LoggedModelOutput(logged.model_id, step=0)])
        self.client.set_terminated(self.run_id, "FINISHED")
        self.ended = True
        self._finished()

    @deferring
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
            self._pending_tags = {}
        try:
            if reason:
                self.log_tags({names.FAILURE_REASON_TAG: reason[:5000]})
            self.flush()
            self.client.set_terminated(self.run_id, status=status)
        except Exception as error:
            if status == "FINISHED" or not is_store_error(error):
                raise
            logging.getLogger(__name__).warning("run %s could not be marked %s: %s", self.run_id, status,
                                                describe(error))
        self.ended = True
        if status == "FINISHED":
            self._finished()

    def _finished(self) -> None:
        if self._checkpointed:  # a finished run keeps its model, not its training state
            delete_checkpoints(self.client, self.run_id, self.artifact_uri)


class NullTracker:
    """Tracking off: the same calls, no store."""

    run_id = None

    def log_params(self, params): pass
    def log_datasets(self, data): pass
    def set_tags(self, tags): pass
    def log_tags(self, tags): pass
    def log_metrics(self, metrics, step): pass
    def pending(self): return []
    def attempt(self, action, what): return True
    def flush(self): pass
    def log_artifacts(self, local_dir, artifact_path=None): pass
    def write_artifact(self, data, artifact_path, name): pass
    def finish_with_model(self, model): pass
    def end(self, status="FINISHED", reason=None, resumable=False): pass


def delete_checkpoints(client, run_id: str, artifact_uri: str | None = None) -> None:
    """Remove the run's checkpoints (best effort: a store that cannot delete keeps them)."""
    try:
        mlflow_compat.delete_artifacts(client, run_id, CHECKPOINT_DIR, artifact_uri)
    except Exception:
        pass
