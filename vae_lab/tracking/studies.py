"""The one lookup of studies and their runs: a study by name or parent run id, the newest study,
its trials, and its best run (the one the study chose on validation).

Where the best run is *chosen*: `vae_lab.study.summary` (on the study's validation objective,
mean over seeds), which tags the parent run with `vae_lab.best_run_id`; this module reads it.
"""

from __future__ import annotations

import math

from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from vae_lab import names
from vae_lab.tracking.uris import redact


def all_pages(search, **kwargs) -> list:
    """Every result of an MLflow search call, page after page."""
    found, token = [], None
    while True:
        page = search(**kwargs, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return found


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
            raise StudyNotFound(f"no study named {study!r} and no run with that id in {redact(client.tracking_uri)}") from None
        parents = client.search_runs(
            [experiment.experiment_id for experiment in client.search_experiments()],
            filter_string=f"tags.`{names.ROLE_TAG}` = 'study' and tags.`{names.STUDY_NAME_TAG}` = '{study}'",
            order_by=["attributes.start_time DESC"], max_results=10)
        if not parents:
            raise StudyNotFound(f"no study named {study!r} and no run with that id in {redact(client.tracking_uri)}") from None
        if len(parents) > 1:
            raise StudyNotFound(f"{len(parents)} studies are named {study!r} (parent runs "
                                f"{', '.join(run.info.run_id for run in parents)}); pass the parent run id") from None
        parent = parents[0]
    if parent.data.tags.get(names.ROLE_TAG) != "study":
        raise StudyNotFound(f"run {parent.info.run_id} is not a study's parent run")
    return parent


def study_parents(client: MlflowClient, experiment_ids: list[str] | None = None, max_results: int = 1000,
                  name: str | None = None) -> list[Run]:
    """The parent runs of studies (tag `vae_lab.role=study`; of the study `name` only, if given), newest first."""
    if experiment_ids is None:
        experiment_ids = [experiment.experiment_id for experiment in all_pages(client.search_experiments)]
    if not experiment_ids or (name is not None and "'" in name):  # no study name has a quote
        return []
    condition = f"tags.`{names.ROLE_TAG}` = 'study'"
    if name is not None:
        condition += f" and tags.`{names.STUDY_NAME_TAG}` = '{name}'"
    return client.search_runs(experiment_ids, filter_string=condition, order_by=["attributes.start_time DESC"],
                              max_results=max_results)


def newest_study(client: MlflowClient, experiment_ids: list[str] | None = None) -> Run | None:
    """The newest study's parent run (in these experiments), or None."""
    parents = study_parents(client, experiment_ids, max_results=1)
    return parents[0] if parents else None


def study_trials(client: MlflowClient, parent: Run, finished_only: bool = True, newest_first: bool = True) -> list[Run]:
    """The study's child runs (FINISHED ones only, unless asked)."""
    condition = f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.info.run_id}'"
    if finished_only:
        condition += " and attributes.status = 'FINISHED'"
    order = "DESC" if newest_first else "ASC"
    return all_pages(client.search_runs, experiment_ids=[parent.info.experiment_id], filter_string=condition,
                     order_by=[f"attributes.start_time {order}"])


def finite_metric(run: Run, name: str) -> float | None:
    value = run.data.metrics.get(name)
    return value if value is not None and math.isfinite(value) else None


def best_run(parent: Run, trials: list[Run]) -> Run | None:
    """Of `trials` (newest first), the one the study chose on validation (`vae_lab.best_run_id`),
    else the one with the lowest val/loss, else the newest; None when there is none.
    Never chosen on test/*."""
    if not trials:
        return None
    named = parent.data.tags.get(names.BEST_RUN_TAG)
    for run in trials:
        if run.info.run_id == named:
            return run
    return lowest_val_loss(trials)


def is_variational_run(run: Run) -> bool:
    """Did the run train a model with a prior to sample from (it logged a KL)?"""
    return names.TRAIN_KL in run.data.metrics


def parse_objectives(tag: str) -> list[tuple[str, str]]:
    """A parent run's `vae_lab.objectives` tag ('val/recon:minimize,val/kl:minimize') as (metric, direction) pairs."""
    objectives = []
    for item in (tag or "").split(","):
        if ":" in item:
            metric, direction = item.rsplit(":", 1)
            objectives.append((metric.strip(), direction.strip()))
    return objectives


def best_on_objective(parent: Run, runs: list[Run]) -> Run | None:
    """Of `runs`, the best on the study's first objective (a validation metric), else the one
    with the lowest val/loss; None when there is none."""
    objectives = parse_objectives(parent.data.tags.get(names.OBJECTIVES_TAG, ""))
    metric, direction = objectives[0] if objectives else ("", "")
    scored = [run for run in runs if metric and finite_metric(run, metric) is not None]
    if scored:
        pick = max if direction == "maximize" else min
        return pick(scored, key=lambda run: run.data.metrics[metric])
    return lowest_val_loss(runs)


def lowest_val_loss(runs: list[Run]) -> Run | None:
    """The run with the lowest val/loss, else the first (the newest, in a newest-first list)."""
    scored = [run for run in runs if finite_metric(run, names.VAL_LOSS) is not None]
    if scored:
        return min(scored, key=lambda run: run.data.metrics[names.VAL_LOSS])
    return runs[0] if runs else None
