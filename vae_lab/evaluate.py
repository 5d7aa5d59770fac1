"""Evaluate finished runs again, later, without retraining: `python -m vae_lab.evaluate`.

    python -m vae_lab.evaluate --run RUN_ID eval.iwae_samples=5000        # one run
    python -m vae_lab.evaluate --study default eval.iwae_samples=5000     # every finished trial of a study
    python -m vae_lab.evaluate --study PARENT_RUN_ID --tracking-uri http://127.0.0.1:5000

Each run's model (its state dict, read with `torch.load(weights_only=True)`) and its config
(`config.yaml`) are loaded back, `eval.*` is replaced by the settings given, and eval/*
(`vae_lab.evaluation.metrics`) is computed and logged into the same run, with its tags and
`eval/kl_per_dim.csv`. The tag `vae_lab.eval_settings` records the settings the latest eval/*
came from (the run's params keep the ones it trained with: MLflow params cannot change).
Only `eval.*` (and `device`, to evaluate elsewhere than where it trained) may be overridden:
anything else would no longer describe the trained model.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from vae_lab import names
from vae_lab.config import Config, ConfigError, apply_overrides, parse_override, validate


class EvaluateError(ConfigError):
    """An unknown run or study, a run without a model, a bad override: one line, exit 2."""


def _checked_overrides(overrides: list[str]) -> list[str]:
    """The overrides, if they are valid eval.* or device settings (checked before anything is read)."""
    for text in overrides:
        key, _ = parse_override(text)
        if not (key.startswith("eval.") or key == "device"):
            raise EvaluateError(f"only eval.* settings (and device) can change after training "
                                f"(e.g. eval.iwae_samples=5000); got {key}")
        if key == "eval.enabled":
            raise EvaluateError("eval.enabled cannot be set here: evaluating is what this command does")
    validate(apply_overrides(Config(), overrides))
    return overrides


def study_runs(client, study: str) -> list:
    """The FINISHED trial runs of a study given by its parent run id or its name, oldest first."""
    from vae_lab.tracking.studies import StudyNotFound, find_study, study_trials

    try:
        parent = find_study(client, study)
    except StudyNotFound as error:
        raise EvaluateError(f"{error}; use --run for a single run") from None
    return study_trials(client, parent, newest_first=False)


def evaluate_run(client, run_id: str, overrides: list[str], data_cache) -> dict[str, float]:
    """eval/* of one finished run with its model, logged into that run; returns the metrics."""
    from mlflow.entities import Metric, RunTag

    from vae_lab.data.datasets import check_digest
    from vae_lab.evaluation.artifacts import write_kl_per_dim
    from vae_lab.training.device import resolve_device
    from vae_lab.evaluation.metrics import evaluate_model
    from vae_lab.names import STATE_DICT_ARTIFACT
    from vae_lab.tracking.logged import IncompatibleModel, has_logged_model, load_logged_model, load_run_config

    if not has_logged_model(client, run_id):
        raise EvaluateError(f"run {run_id} has no model ({STATE_DICT_ARTIFACT}) to evaluate; "
                            "it was trained with tracking.log_model=false or did not finish")
    config = validate(apply_overrides(load_run_config(client, run_id), overrides))
    device = resolve_device(config.device)
    data = data_cache.get(config, device)
    check_digest(data, client.get_run(run_id).data.tags.get(names.DATA_DIGEST_TAG), f"run {run_id}")
    try:
        model, _ = load_logged_model(run_id, client.tracking_uri, map_location=device, config=config)
    except IncompatibleModel as error:
        raise EvaluateError(str(error)) from None
    evaluation = evaluate_model(model.to(device), data, config, device)
    settings = " ".join(f"{key}={value}" for key, value in config.flat().items() if key.startswith("eval."))
    timestamp = int(time.time() * 1000)
    tags = {**evaluation.tags, names.EVAL_SETTINGS_TAG: settings}
    client.log_batch(run_id, metrics=[Metric(key, float(value), timestamp, 0) for key, value in evaluation.metrics.items()],
                     tags=[RunTag(key, str(value)) for key, value in tags.items()])
    if evaluation.kl_per_dim is not None:
        with tempfile.TemporaryDirectory() as folder:
            write_kl_per_dim(evaluation, Path(folder))
            client.log_artifacts(run_id, folder)
    return evaluation.metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vae_lab.evaluate",
        description="Compute eval/* again for finished runs (e.g. 5000 importance samples) and log them "
                    "into the same runs, without retraining.",
        epilog="Overrides: eval.iwae_samples=5000 eval.iwae_points=10000 eval.max_points=20000")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--run", help="a finished run's id")
    target.add_argument("--study", help="a study's name or parent run id: all of its finished trials")
    parser.add_argument("overrides", nargs="*", help="eval.key=value")
    parser.add_argument("--tracking-uri", default="", help="MLflow store (default $MLFLOW_TRACKING_URI, "
                        "else mlruns/mlflow.db)")
    args = parser.parse_args(argv)

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    from tqdm.auto import tqdm

    from vae_lab.data.datasets import DataUnavailable
    from vae_lab.data.cache import DataCache
    from vae_lab.tracking.logged import has_logged_model
    from vae_lab.tracking.checks import missing_store
    from vae_lab.tracking.uris import redact, resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    try:
        overrides = _checked_overrides(args.overrides)
        problem = missing_store(tracking_uri)
        if problem:
            raise EvaluateError(problem)
        client = MlflowClient(tracking_uri=tracking_uri)
        if args.run:
            try:
                status = client.get_run(args.run).info.status
            except MlflowException:
                raise EvaluateError(f"unknown run id {args.run!r}: no such run in {redact(tracking_uri)}") from None
            if status != "FINISHED":
                raise EvaluateError(f"run {args.run} is {status}; only a FINISHED run's model is evaluated")
            run_ids = [args.run]
        else:
            run_ids = [run.info.run_id for run in study_runs(client, args.study)]
            without_model = [run_id for run_id in run_ids if not has_logged_model(client, run_id)]
            run_ids = [run_id for run_id in run_ids if run_id not in without_model]
            if without_model:  # checked before anything is written
                print(f"skipping {len(without_model)} finished trial(s) without a logged model", file=sys.stderr)
            if not run_ids:
                raise EvaluateError(f"study {args.study!r} has no finished trial with a model to evaluate")
        data_cache = DataCache()
        results = {}
        for run_id in tqdm(run_ids, desc="evaluate", unit="run", disable=len(run_ids) == 1):
            results[run_id] = evaluate_run(client, run_id, overrides, data_cache)
    except (ConfigError, DataUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for run_id, metrics in results.items():
        print(f"run {run_id}:")
        for key, value in sorted(metrics.items()):
            print(f"  {key:28s} {value:.4f}")
    print(f"logged into {len(results)} run(s) in {redact(tracking_uri)}")
    return 0


if __name__ == "__main__":
    from vae_lab.cli import exit_now

    exit_now(main())
