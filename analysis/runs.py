"""A study (or a single run) read back from MLflow into pandas.

A study is a parent run whose children are its trials (linked by the `mlflow.parentRunId`
tag). Everything here reads from the tracking store; nothing comes from a training process.
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from vae_lab.config import parse_yaml
from vae_lab import names
from vae_lab.models.registry import MODEL_FAMILIES
from vae_lab.tracking.studies import newest_study, parse_objectives, study_parents
from vae_lab.tracking.checks import missing_store
from vae_lab.names import ROLE_TAG, STUDY_NAME_TAG

# our own tqdm bars count the runs; MLflow's per-download bars would drown them

STUDY_YAML_ARTIFACT = "study/study.yaml"
SEED_PARAM = "train.seed"


class ReportInputError(Exception):
    """The store, experiment or run asked for does not exist; the message is one line."""


@dataclass
class Study:
    """Everything the report needs to know about which runs it covers."""

    tracking_uri: str
    experiment_name: str
    name: str
    target_run: Run  # the study's parent run, or the single run being reported
    runs: pd.DataFrame  # one row per run, as mlflow.search_runs returns them (+ `family`, `label`)
    swept: list[str]  # dotted config keys that vary across the runs
    objectives: list[tuple[str, str]] = field(default_factory=list)  # (metric, minimize|maximize)
    study_yaml: str | None = None
    is_study: bool = True

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri)

    @property
    def config_params(self) -> list[str]:
        """Swept keys that define a configuration: everything swept except the seed."""
        return [key for key in self.swept if key != SEED_PARAM]

    @property
    def finished(self) -> pd.DataFrame:
        return self.runs[self.runs["status"] == "FINISHED"]


# ----------------------------------------------------------------------------- the store

def add_tracking_uri_option(parser) -> None:
    """`--tracking-uri`, as every analysis command takes it."""
    parser.add_argument("--tracking-uri", default="",
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else mlruns/mlflow.db)")


def open_store(tracking_uri: str) -> MlflowClient:
    """A client for an existing store; an SQLite file that is not there is an error, not created."""
    problem = missing_store(tracking_uri)
    if problem:
        raise ReportInputError(problem)
    return MlflowClient(tracking_uri=tracking_uri)


def _experiment_names(client: MlflowClient) -> list[str]:
    return sorted(experiment.name for experiment in client.search_experiments())


def recent_studies(client: MlflowClient, limit: int = 8) -> list[str]:
    experiments = {experiment.experiment_id: experiment.name for experiment in client.search_experiments()}
    runs = study_parents(client, list(experiments), max_results=limit)
    return [f"{run.info.run_id} ({run.data.tags.get('vae_lab.study_name', run.info.run_name)}, "
            f"experiment {experiments.get(run.info.experiment_id, '?')})" for run in runs]


def newest_parent_of(client: MlflowClient, study_name: str) -> str:
    """The newest parent run of the study named `study_name`, in any experiment."""
    parents = study_parents(client, name=study_name, max_results=1)
    if not parents:
        known = sorted({run.data.tags.get(names.STUDY_NAME_TAG, "") for run in study_parents(client)} - {""})
        raise ReportInputError(f"no study named {study_name!r} in this store; its studies: {', '.join(known) or 'none'}")
    return parents[0].info.run_id


def newest_study_id(client: MlflowClient, experiment_name: str) -> str:
    """The newest parent run of an experiment: tagged `vae_lab.role=study`, else any run with children."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None or experiment.lifecycle_stage == "deleted":
        names = ", ".join(_experiment_names(client)) or "none"
        raise ReportInputError(f"no experiment named {experiment_name!r}; experiments in this store: {names}")
    ids = [experiment.experiment_id]
    study = newest_study(client, ids)
    if study is not None:
        return study.info.run_id
    children = client.search_runs(ids, filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` != ''", max_results=5000)
    parents = {run.data.tags[MLFLOW_PARENT_RUN_ID] for run in children}
    if parents:
        newest = max((client.get_run(parent) for parent in parents), key=lambda run: run.info.start_time)
        return newest.info.run_id
    recent = client.search_runs(ids, order_by=["attributes.start_time DESC"], max_results=5)
    listed = ", ".join(f"{run.info.run_id} ({run.info.run_name})" for run in recent) or "none"
    raise ReportInputError(f"experiment {experiment_name!r} has no study (parent run); "
                           f"its recent runs: {listed}; report one with --run RUN_ID")


def get_run(client: MlflowClient, run_id: str) -> Run:
    try:
        return client.get_run(run_id)
    except MlflowException:
        studies = ", ".join(recent_studies(client)) or "none"
        names = ", ".join(_experiment_names(client)) or "none"
        raise ReportInputError(f"no run {run_id!r} in this store; recent studies: {studies}; "
                               f"experiments: {names}") from None


# ----------------------------------------------------------------------------- loading

def _search(tracking_uri: str, experiment_id: str, filter_string: str) -> pd.DataFrame:
    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.search_runs(experiment_ids=[experiment_id], filter_string=filter_string,
                              order_by=["attributes.start_time ASC"], output_format="pandas")


def parse_param(value):
    """Param strings back to numbers where they are numbers ('4' -> 4, '1e-3' -> 0.001)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value
    return int(number) if number.is_integer() and "." not in str(value) and "e" not in str(value).lower() \
        else number


def display_param(value) -> str:
    """A param as a person writes it: '1.0' -> '1', '0.001' -> '0.001', 'ae' -> 'ae'."""
    parsed = parse_param(value)
    if isinstance(parsed, float):
        return f"{parsed:g}"
    return str(parsed)


def numeric_column(runs: pd.DataFrame, column: str) -> pd.Series | None:
    """The column as numbers when every present value is one, else None."""
    if column not in runs:
        return None
    values = pd.to_numeric(runs[column], errors="coerce")
    present = runs[column].notna()
    if present.sum() == 0 or values[present].isna().any():
        return None
    return values


def swept_params(parent_tags: dict[str, str], runs: pd.DataFrame) -> list[str]:
    """From the parent's `vae_lab.swept_params` tag, else the params whose values differ across runs."""
    listed = parent_tags.get(names.SWEPT_PARAMS_TAG, "").strip()
    if listed:
        return [key.strip() for key in listed.split(",") if key.strip()]
    varying = []
    for column in sorted(column for column in runs.columns if column.startswith("params.")):
        if runs[column].astype("string").nunique(dropna=False) > 1:
            varying.append(column[len("params."):])
    return varying




def config_label(row: pd.Series, config_params: list[str]) -> str:
    """A short readable name for one configuration: family, then the swept values."""
    parts = [str(row["family"])]
    for key in config_params:
        if key == "model.name":
            continue
        value = row.get(f"params.{key}")
        parts.append(f"{key.split('.')[-1]}={display_param(value)}")
    return ", ".join(parts)


LIKELIHOOD_METRICS = ("val/elbo", "test/elbo", "eval/nll_iwae")


def honest_likelihood_metrics(runs: pd.DataFrame) -> None:
    """In place: blank the ELBOs and NLLs of runs logged before vae_lab logged them only for
    normalized likelihoods (Bernoulli on grey pixels; Gaussian without its constant, i.e.
    without a loss.gaussian_std param), and add `val/recon+kl` for VAEs without a val/elbo."""
    unknown = pd.Series(index=runs.index, dtype=object)  # a run without these params is left as it is
    likelihood = runs.get("params.loss.likelihood", unknown)
    binarize = runs.get("params.data.binarize", unknown)
    with_constant = runs.get("params.loss.gaussian_std", unknown).notna()
    loss_only = ((likelihood == "bernoulli") & (binarize == "none")) | ((likelihood == "gaussian") & ~with_constant)
    for metric in LIKELIHOOD_METRICS:
        if f"metrics.{metric}" in runs:
            runs.loc[loss_only, f"metrics.{metric}"] = np.nan
    recon, kl = runs.get(f"metrics.{names.VAL_RECON}"), runs.get(f"metrics.{names.VAL_KL}")
    if recon is not None and kl is not None:
        elbo = runs.get(f"metrics.{names.VAL_ELBO}", pd.Series(np.nan, index=runs.index))
        runs[f"metrics.{names.VAL_RECON_PLUS_KL}"] = (recon + kl).where(elbo.isna())


def load_study(tracking_uri: str, run_id: str) -> Study:
    """The study whose parent is `run_id`, or a one-run report when `run_id` has no children."""
    client = open_store(tracking_uri)
    target = get_run(client, run_id)
    experiment = client.get_experiment(target.info.experiment_id)
    children = _search(tracking_uri, target.info.experiment_id, f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{run_id}'")
    tags = target.data.tags
    is_study = tags.get(ROLE_TAG) == "study" or not children.empty
    runs = children if is_study else _search(tracking_uri, target.info.experiment_id,
                                             f"attributes.run_id = '{run_id}'")
    runs = runs.reset_index(drop=True)
    for column in ("run_id", "status", "start_time", "end_time"):  # a study with no trials yet
        if column not in runs:
            runs[column] = pd.Series(dtype=object)
    if "tags.model" in runs:
        runs["family"] = runs["tags.model"].fillna(runs.get("params.model.name"))
    else:
        runs["family"] = runs.get("params.model.name", pd.Series(["?"] * len(runs)))
    runs["family"] = runs["family"].fillna("?")
    honest_likelihood_metrics(runs)
    swept = swept_params(tags, runs) if is_study else []
    config_params = [key for key in swept if key != SEED_PARAM]
    runs["label"] = pd.Series([config_label(row, config_params) for _, row in runs.iterrows()],
                              index=runs.index, dtype=object)
    duration = pd.to_datetime(runs["end_time"], utc=True) - pd.to_datetime(runs["start_time"], utc=True)
    runs["seconds"] = duration.dt.total_seconds()  # NaN while a run is still RUNNING
    name = tags.get(STUDY_NAME_TAG) or target.info.run_name or run_id
    return Study(
        tracking_uri=tracking_uri, experiment_name=experiment.name, name=name, target_run=target,
        runs=runs, swept=swept, objectives=parse_objectives(tags.get(names.OBJECTIVES_TAG, "")),
        study_yaml=read_text_artifact(client, run_id, STUDY_YAML_ARTIFACT) if is_study else None,
        is_study=is_study,
    )


# ----------------------------------------------------------------------------- artifacts and history

def download_artifact(client: MlflowClient, run_id: str, path: str, folder: Path) -> Path | None:
    """The artifact's local copy under `folder`, or None when the run does not have it."""
    try:
        return Path(client.download_artifacts(run_id, path, str(folder)))
    except (MlflowException, OSError):
        return None


def read_text_artifact(client: MlflowClient, run_id: str, path: str) -> str | None:
    with tempfile.TemporaryDirectory() as folder:
        local = download_artifact(client, run_id, path, Path(folder))
        return local.read_text() if local is not None and local.is_file() else None


def metric_history(client: MlflowClient, run_id: str, key: str) -> pd.DataFrame:
    """Every logged value of one metric of one run, by step, then time logged: columns step, timestamp, value."""
    history = client.get_metric_history(run_id, key)
    frame = pd.DataFrame({"step": [metric.step for metric in history],
                          "timestamp": [metric.timestamp for metric in history],
                          "value": [metric.value for metric in history]})
    return frame.sort_values(["step", "timestamp"], kind="stable").reset_index(drop=True)


def paired_params(study_yaml: str | None) -> list[str]:
    """The config keys a study file sets together through `search_space.points`."""
    if not study_yaml:
        return []
    try:
        document = parse_yaml(study_yaml)
        points = document.get("search_space", {}).get("points") or []
    except Exception:  # a hand-written or damaged study.yaml: no pairs
        return []
    return sorted({key for point in points if isinstance(point, dict) for key in point})


@functools.lru_cache(maxsize=None)
def _registered_as_variational(family: str) -> bool | None:
    """What a registered family says of itself (None: not registered). Cached: listing the
    registered names reads the installed packages' entry points."""
    if family not in MODEL_FAMILIES.names():
        return None
    return bool(getattr(MODEL_FAMILIES.resolve(family), "variational", False))


def is_vae_family(family: str, logged_a_kl: bool) -> bool:
    """Is `family` (a run's model tag) a VAE? A registered family says so itself; a user's class
    named by path (tagged with its class name) is one if its runs logged a KL."""
    registered = _registered_as_variational(family)
    return logged_a_kl if registered is None else registered


def variational_rows(runs: pd.DataFrame) -> pd.Series:
    """Which runs trained a VAE (`is_vae_family`)."""
    logged = pd.Series(False, index=runs.index)
    for name in (names.TRAIN_KL, names.VAL_KL):
        if f"metrics.{name}" in runs:
            logged |= runs[f"metrics.{name}"].notna()
    return pd.Series([is_vae_family(str(family), bool(kl)) for family, kl in zip(runs["family"], logged)],
                     index=runs.index, dtype=bool)
