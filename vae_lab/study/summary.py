"""The end-of-study summary on the parent run, written (again) whenever a sweep command ends.

Artifacts under `study/` on the parent run:

    study.yaml          the study file as run (after overrides)
    trials.csv          one row per trial: state, objective values, swept values, run id, seconds
    summary.json        counts, best trial or Pareto front, best configuration over seeds;
                        "importance": {"file": ...} or {"skipped": why}; "plot_errors" if any
    importances.json    fANOVA importance of each swept param per objective
                        (vae_lab.study.importance); absent where it cannot be computed
    *.png               Optuna's plots, each where it applies (vae_lab.study.plots):
                        optimization_history.png or pareto_front.png, param_importances.png,
                        slice.png, contour.png (per objective with several: slice_val_kl.png)
"""

from __future__ import annotations

import datetime
import json
import math
import statistics
import tempfile
from pathlib import Path

import optuna
import pandas as pd
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from vae_lab import names
from vae_lab.study.spec import SEED_PARAM, StudySpec
from vae_lab.study.importance import param_importances, varying_params
from vae_lab.study.plots import save_plots
from vae_lab.study.storage import REASON_ATTR, REPORTED_ATTR, RETRY_OF_ATTR, RUN_ID_ATTR, assignment_of, real_trials

ARTIFACT_DIR = "study"
IMPORTANCES_FILE = "importances.json"

STATE_NAMES = {TrialState.COMPLETE: "COMPLETE", TrialState.PRUNED: "PRUNED", TrialState.FAIL: "FAIL",
               TrialState.RUNNING: "RUNNING", TrialState.WAITING: "WAITING"}


def trials_table(study: optuna.Study, spec: StudySpec) -> pd.DataFrame:
    """One row per trial: number, state, objective values, swept params, run_id, seconds."""
    metrics = [objective.metric for objective in spec.objectives]
    swept = spec.swept_keys()
    rows = []
    for trial in real_trials(study):
        assignment = assignment_of(trial)
        row = {"number": trial.number, "state": STATE_NAMES.get(trial.state, str(trial.state))}
        values = trial.values if trial.state == TrialState.COMPLETE and trial.values else [None] * len(metrics)
        row.update(zip(metrics, values))
        row.update({key: _cell(assignment.get(key)) for key in swept})
        row["run_id"] = trial.user_attrs.get(RUN_ID_ATTR, "")
        row["seconds"] = round(trial.duration.total_seconds(), 2) if trial.duration else None
        row["failure_reason"] = trial.user_attrs.get(REASON_ATTR, "")
        rows.append(row)
    columns = ["number", "state", *metrics, *swept, "run_id", "seconds", "failure_reason"]
    return pd.DataFrame(rows, columns=columns)


def _cell(value):
    return json.dumps(value) if isinstance(value, (list, tuple)) else value


def best_trials(study: optuna.Study, spec: StudySpec) -> list[optuna.trial.FrozenTrial]:
    """The best trial (one objective) or the Pareto front (several); [] before any completes."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    return list(study.best_trials) if len(spec.objectives) > 1 else [study.best_trial]


def best_configuration(study: optuna.Study, spec: StudySpec) -> dict | None:
    """The configuration (swept values but the seed) whose objective, averaged over its
    seeds, is best: a single lucky seed does not win. Carries the test/* means of that
    configuration's trials, reported for what validation chose. Single-objective studies only."""
    if len(spec.objectives) != 1:
        return None
    objective = spec.objectives[0]
    groups: dict[str, list[optuna.trial.FrozenTrial]] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        settings = {key: value for key, value in assignment_of(trial).items() if key != SEED_PARAM}
        groups.setdefault(json.dumps(settings, sort_keys=True, default=str), []).append(trial)
    if not groups:
        return None
    sign = 1 if objective.direction == "minimize" else -1
    key, trials = min(groups.items(), key=lambda item: sign * _mean([t.values[0] for t in item[1]]))
    best_trial = min(trials, key=lambda trial: sign * trial.values[0])
    reported = [trial.user_attrs.get(REPORTED_ATTR) or {} for trial in trials]
    test_names = sorted({name for metrics in reported for name in metrics})
    return {
        "params": json.loads(key),
        "selected_on": objective.metric,
        "seeds": len(trials),
        "trials": sorted(trial.number for trial in trials),
        "mean": _mean([trial.values[0] for trial in trials]),
        "std": _std([trial.values[0] for trial in trials]),
        "test": {name: {"mean": _mean([m[name] for m in reported if name in m]),
                        "std": _std([m[name] for m in reported if name in m])} for name in test_names},
        "best_run_id": best_trial.user_attrs.get(RUN_ID_ATTR, ""),
    }


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def running_seconds(trials: list[optuna.trial.FrozenTrial]) -> float:
    """Seconds during which at least one trial ran: the union of the trials' start-to-end spans
    (a running trial's ends now). Waiting, an interruption's gap and a rerun that finds nothing
    left to do add nothing."""
    now = datetime.datetime.now()  # Optuna's own clock: local, naive
    spans = sorted((trial.datetime_start, trial.datetime_complete or now) for trial in trials
                   if trial.datetime_start is not None)
    total, covered_until = 0.0, None
    for start, end in spans:
        if covered_until is not None and start < covered_until:
            start = covered_until
        if end > start:
            total += (end - start).total_seconds()
        covered_until = end if covered_until is None else max(covered_until, end)
    return total


def summarize(study: optuna.Study, spec: StudySpec, table: pd.DataFrame, wall_seconds: float) -> dict:
    counts = {name.lower(): int((table["state"] == name).sum())
              for name in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}
    # a trial stopped from outside (Ctrl-C, a lost worker, a Slurm time limit) is FAIL in Optuna
    # and goes on as its retry: "retried", not "failed"
    retried = {str(trial.user_attrs[RETRY_OF_ATTR]) for trial in real_trials(study) if RETRY_OF_ATTR in trial.user_attrs}
    counts["retried"] = int(sum(state == "FAIL" and str(number) in retried
                                for state, number in zip(table["state"], table["number"])))
    counts["failed"] = counts.pop("fail") - counts["retried"]
    best = [{"number": trial.number, "run_id": trial.user_attrs.get(RUN_ID_ATTR, ""),
             "values": dict(zip([o.metric for o in spec.objectives], trial.values)),
             "params": assignment_of(trial)} for trial in best_trials(study, spec)]
    summary = {
        "study_name": spec.name,
        "sampler": spec.sampler,
        "objectives": [str(objective) for objective in spec.objectives],
        "swept_params": spec.swept_keys(),
        "counts": {**counts, "total": int(len(table))},
        "total_seconds": round(wall_seconds, 1),
        "trial_seconds": round(float(table["seconds"].fillna(0).sum()), 1),
    }
    summary["pareto_front" if len(spec.objectives) > 1 else "best_trial"] = \
        best if len(spec.objectives) > 1 else (best[0] if best else None)
    if len(spec.objectives) == 1:
        summary["best_configuration"] = best_configuration(study, spec)
    return summary


def log_summary(client: MlflowClient, parent_run_id: str, study: optuna.Study, spec: StudySpec) -> dict:
    """Write the summary artifacts and metrics on the parent run; returns summary.json's content."""
    table = trials_table(study, spec)
    summary = summarize(study, spec, table, running_seconds(study.get_trials(deepcopy=False)))
    params = varying_params(study)
    importances = param_importances(study, spec, params)
    has_importances = "skipped" not in importances
    summary["importance"] = ({"file": f"{ARTIFACT_DIR}/{IMPORTANCES_FILE}", "evaluator": importances["evaluator"]}
                             if has_importances else importances)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        plot_errors = save_plots(study, spec, params, importances if has_importances else None, folder)
        if plot_errors:
            summary["plot_errors"] = plot_errors
        if has_importances:
            (folder / IMPORTANCES_FILE).write_text(json.dumps(importances, indent=2))
        (folder / "study.yaml").write_text(spec.to_yaml())
        table.to_csv(folder / "trials.csv", index=False)
        (folder / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        client.log_artifacts(parent_run_id, str(folder), ARTIFACT_DIR)
    counts = summary["counts"]
    metrics = {f"study/{name}": float(counts[name]) for name in ("complete", "pruned", "failed")}
    metrics["study/total_seconds"] = summary["total_seconds"]
    chosen = summary.get("best_configuration")
    if chosen:
        metrics[f"best/{chosen['selected_on']}"] = chosen["mean"]
        metrics.update({f"best/{name}": values["mean"] for name, values in chosen["test"].items()
                        if math.isfinite(values["mean"])})
        client.set_tag(parent_run_id, names.BEST_RUN_TAG, chosen["best_run_id"])
    logged = client.get_run(parent_run_id).data.metrics
    for key, value in metrics.items():
        if logged.get(key) != value:  # a rerun that changed nothing adds no point to the histories
            client.log_metric(parent_run_id, key, value)
    return summary
