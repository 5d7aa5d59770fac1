"""The runs the page can serve: the store's finished runs with a model, the one it opens on, and
the models of recently used runs, kept loaded."""

from __future__ import annotations

import threading
from collections import OrderedDict

from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from vae_lab import names
from vae_lab.data.datasets import DataUnavailable
from vae_lab.names import STATE_DICT_ARTIFACT, TEST_LOSS, VAL_LOSS
from vae_lab.serve.images import RequestError, ServedRun
from vae_lab.tracking.logged import has_logged_model
from vae_lab.tracking.studies import (all_pages, best_on_objective, best_run, finite_metric, is_variational_run,
                                      lowest_val_loss, study_parents, study_trials)
from vae_lab.tracking.uris import redact

LOADED_RUNS_KEPT = 8


class RunCatalog:
    """The store's runs that can be served: FINISHED, with `model_state/state_dict.pt`."""

    def __init__(self, tracking_uri: str):
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self._has_model: dict[str, bool] = {}  # a finished run's artifacts do not change

    def experiment_names(self) -> dict[str, str]:
        experiments = all_pages(self.client.search_experiments, view_type=ViewType.ACTIVE_ONLY)
        return {experiment.experiment_id: experiment.name for experiment in experiments}

    def has_model(self, run_id: str) -> bool:
        if run_id not in self._has_model:
            self._has_model[run_id] = has_logged_model(self.client, run_id)
        return self._has_model[run_id]

    def servable(self, experiment_ids: list[str] | None = None) -> list[Run]:
        """Finished runs with a model, newest first."""
        if experiment_ids is None:
            experiment_ids = list(self.experiment_names())
        if not experiment_ids:
            return []
        runs = all_pages(self.client.search_runs, experiment_ids=experiment_ids,
                          filter_string="attributes.status = 'FINISHED'",
                          order_by=["attributes.start_time DESC"])
        return [run for run in runs if self.has_model(run.info.run_id)]

    def newest_study_best(self) -> Run | None:
        """The best servable run, on validation, of the newest study that has one
        (`vae_lab.tracking.studies.best_run`); when that is an AE, which has no prior to sample
        from, the study's best variational run on its objective, if it has one. None without studies."""
        for parent in study_parents(self.client, list(self.experiment_names()), max_results=20):
            trials = [run for run in study_trials(self.client, parent) if self.has_model(run.info.run_id)]
            best = best_run(parent, trials)
            if best is not None and not is_variational_run(best):
                best = best_on_objective(parent, [run for run in trials if is_variational_run(run)]) or best
            if best is not None:
                return best
        return None

    def get(self, run_id: str) -> Run:
        """The run, or RequestError 404 when the store has no such run or it has no model."""
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            raise RequestError(f"unknown run id {run_id!r}: no such run in {redact(self.tracking_uri)}",
                               status=404) from None
        if not self.has_model(run_id):
            raise RequestError(f"run {run_id} has no model ({STATE_DICT_ARTIFACT}); "
                               "choose a finished training run (GET /api/runs lists them)", status=404)
        return run


def describe_run(run: Run, experiment_names: dict[str, str]) -> dict:
    params, tags = run.data.params, run.data.tags
    model = tags.get(names.MODEL_TAG) or params.get("model.name", "?")
    latent_dim = params.get("model.latent_dim")
    kl_weight = params.get("loss.kl_weight")
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "experiment": experiment_names.get(run.info.experiment_id, run.info.experiment_id),
        "study": tags.get(names.STUDY_NAME_TAG),
        "trial": tags.get(names.TRIAL_NUMBER_TAG),
        "model": model,
        "dataset": tags.get(names.DATASET_TAG) or params.get("data.name"),
        "latent_dim": int(latent_dim) if latent_dim is not None else None,
        "kl_weight": float(kl_weight) if kl_weight is not None and names.TRAIN_KL in run.data.metrics else None,
        "val_loss": finite_metric(run, VAL_LOSS),  # what --experiment chooses on
        "test_loss": finite_metric(run, TEST_LOSS),  # reported, never chosen on
        "start_time": run.info.start_time,
    }


def choose_run(catalog: RunCatalog, run_id: str | None = None, experiment: str | None = None) -> Run:
    """The run the server starts with: `run_id`; else the experiment's finished run with a
    model and the lowest val/loss (its newest such run when none logged val/loss, as runs
    from before the validation split); else the newest study's best run on validation
    (`RunCatalog.newest_study_best`); else the newest finished run with a model.
    Never chosen on test/loss. Raises LookupError with a one-line message."""
    if run_id:
        try:
            return catalog.get(run_id)
        except RequestError as error:
            raise LookupError(str(error)) from None
    if experiment:
        found = catalog.client.get_experiment_by_name(experiment)
        if found is None or found.lifecycle_stage == "deleted":
            known = ", ".join(sorted(catalog.experiment_names().values())) or "none"
            raise LookupError(f"no experiment named {experiment!r} in {redact(catalog.tracking_uri)}; "
                              f"experiments: {known}")
        servable = catalog.servable([found.experiment_id])
        if not servable:
            raise LookupError(f"experiment {experiment!r} has no finished run with a model; "
                              "train one: python -m vae_lab.train")
        return lowest_val_loss(servable)
    best = catalog.newest_study_best()
    if best is not None:
        return best
    servable = catalog.servable()
    if not servable:
        raise LookupError(f"no finished run with a model in {redact(catalog.tracking_uri)}; "
                          "train one: python -m vae_lab.train")
    return servable[0]


class LoadedRuns:
    """Models of recently used runs, kept loaded (least recently used dropped first)."""

    def __init__(self, catalog: RunCatalog, keep: int = LOADED_RUNS_KEPT):
        self.catalog = catalog
        self.keep = keep
        self._loaded: OrderedDict[str, ServedRun] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, run_id: str) -> ServedRun:
        with self._lock:
            if run_id in self._loaded:
                self._loaded.move_to_end(run_id)
                return self._loaded[run_id]
            self.catalog.get(run_id)
            try:
                served = ServedRun.load(run_id, self.catalog.tracking_uri)
            except DataUnavailable as error:
                raise RequestError(f"run {run_id}: {error}", status=503) from None
            self._loaded[run_id] = served
            while len(self._loaded) > self.keep:
                self._loaded.popitem(last=False)
            return served
