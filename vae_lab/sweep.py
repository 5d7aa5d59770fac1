"""Studies over run configs: a grid or an Optuna search, one MLflow parent run + one child per trial.

    python -m vae_lab.sweep                                   # experiments/default.yaml
    python -m vae_lab.sweep experiments/seed000_nas.yaml
    python -m vae_lab.sweep experiments/latent_kl_optuna.yaml study.n_trials=40 base.train.epochs=20
    python -m vae_lab.sweep experiments/latent_kl_optuna.yaml --workers 2
    python -m vae_lab.sweep FILE --storage postgresql://... --tracking-uri http://mlflow-host:5000

Running the same command again resumes the study, whatever stopped it (Ctrl-C, kill -9, a
store that was down): trials its stopped workers left are continued from their checkpoints
in their own MLflow runs. Commands with any `--workers` on one store join one study; the
Optuna storage is the source of truth for which trials exist, and a grid's points are
claimed there atomically, so several workers (processes or machines) never run one point twice.

Where the parts live: the study's session and parent run `study_session`, Optuna's sampler and
suggestions `study_optuna`, claims and retries `study_claims`, running and telling trials
`study_trials`, worker identity, heartbeats and helper processes `study_workers`, what stopped
workers left behind `study_repair`, store checks `stores`.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import optuna
from tqdm.auto import tqdm

from . import names
from . import study_storage as store
from .batched import plan_batches
from .config import ConfigError
from .data import DataUnavailable
from .engine import resolve_device
from .stores import check_optuna_storage, check_tracking_store, short_http_retries
from .tracking import browse_lines
from .study import Choices, load_study_spec
from .study_progress import TrialsBar
from .study_repair import repair_stale_trials
from .study_session import DataCache, Session, StudyRefused, SweepSettings, finish_parent, open_session, unfinished
from .study_trials import work
from .study_workers import Helpers
from .tracking import StoreUnavailable, default_store_dir, resolve_tracking_uri

__all__ = ["DataCache", "StudyRefused", "SweepSettings", "main", "run_sweep"]

DEFAULT_STUDY_FILE = Path(__file__).resolve().parents[1] / "experiments" / "default.yaml"


class Interrupted(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (train() ends the running MLflow run KILLED)."""


def _raise_interrupted(signum, frame):
    raise Interrupted(f"signal {signum}")


def worker_process(settings: SweepSettings) -> None:
    """Entry point of an extra `--workers` process (spawned; quiet)."""
    import os

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    short_http_retries()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    session = open_session(settings, repair=False)
    try:
        work(session, progress=False)
    except KeyboardInterrupt:
        pass


# ----------------------------------------------------------------------------- the command

def print_results(session: Session, summary: dict) -> None:
    settings, counts = session.settings, summary["counts"]
    print(f"\nstudy {session.spec.name!r}: {counts['complete']} complete, {counts['pruned']} pruned, "
          f"{counts['failed']} failed, {counts['running'] + counts['waiting']} left "
          f"({summary['total_seconds']:.0f} s)")
    chosen = summary.get("best_configuration")
    if chosen:
        params = ", ".join(f"{key}={value}" for key, value in chosen["params"].items()) or "the base config"
        over = f"mean over {chosen['seeds']} seeds" if chosen["seeds"] > 1 else "1 trial"
        print(f"best: {params} ({chosen['selected_on']}={chosen['mean']:.4g}, {over}; chosen on validation)")
        reported = names.held_out_counterpart(chosen["selected_on"])
        if reported in chosen["test"]:
            test = chosen["test"][reported]
            spread = f" ± {test['std']:.3g}" if test["std"] is not None else ""
            print(f"  its test score (reported, not used to choose): {reported}={test['mean']:.4g}{spread}")
    for entry in summary.get("pareto_front") or []:
        values = ", ".join(f"{metric}={value:.4g}" for metric, value in entry["values"].items())
        print(f"pareto: trial {entry['number']} ({values})")
    experiment = session.spec.base_config().tracking.experiment
    print(f"results: MLflow experiment {experiment!r}, parent run {session.parent_run_id} "
          f"(study/trials.csv, study/summary.json)")
    experiment_id = session.client.get_run(session.parent_run_id).info.experiment_id
    print("\n".join(browse_lines(settings.tracking_uri, experiment_id, session.parent_run_id, "parent")))
    print(f"  report:  python -m analysis.report --run {session.parent_run_id}")
    print(f"  optuna:  study {session.spec.name!r} in {store.redact_url(settings.storage_url)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vae_lab.sweep",
        description="Run a study (grid or Optuna search) of AE/VAE trainings, tracked in MLflow. "
                    "Running the same command again resumes it.",
        epilog="Overrides: study.n_trials=40 base.train.epochs=20 search_space.model.latent_dim=[2,8]")
    parser.add_argument("study_file", nargs="?", default=None,
                        help=f"study YAML (default: {DEFAULT_STUDY_FILE.relative_to(DEFAULT_STUDY_FILE.parents[1])})")
    parser.add_argument("overrides", nargs="*", help="section.key=value, sections study, base, search_space")
    parser.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1)")
    parser.add_argument("--storage", default="", help="Optuna storage URL (default: a file beside the MLflow store)")
    parser.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: base.tracking.uri, "
                        "$MLFLOW_TRACKING_URI, else mlruns/mlflow.db)")
    parser.add_argument("--new-study", action="store_true",
                        help="start the study over even if one with this name is stored (its MLflow runs stay)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the file and list the trials it would run; create and run nothing")
    return parser


def print_plan(settings: SweepSettings) -> None:
    """What a study would run: its grid points (with their batches), or its sampled space."""
    spec = settings.spec
    print(f"study {spec.name!r}: sampler {spec.sampler}, pruner {spec.pruner}, objectives "
          + ", ".join(str(objective) for objective in spec.objectives))
    print(f"  MLflow: {settings.tracking_uri}   Optuna: {store.redact_url(settings.storage_url)}")
    if not spec.is_grid:
        print(f"  {spec.n_trials} trials sampled from:")
        for key, param in spec.space.items():
            if isinstance(param, Choices):
                print(f"    {key}: one of {list(param.values)}")
            else:
                scale = ", log scale" if param.log else ""
                step = f", step {param.step}" if param.step else ""
                print(f"    {key}: {param.type} in [{param.low}, {param.high}]{scale}{step}")
        if spec.points:
            print(f"    points: {len(spec.points)} paired assignments")
        return
    points = spec.grid_points()
    configs = [spec.trial_config(point) for point in points]
    batched = spec.batch_trials != "off" and not (spec.batch_trials == "auto" and spec.pruner != "none")
    batches = plan_batches(configs, spec.batch_trials) if batched else [[index] for index in range(len(points))]
    batch_of = {index: number for number, batch in enumerate(batches) for index in batch}
    print(f"  {len(points)} grid points, {len(batches)} training passes (study.batch_trials={spec.batch_trials}):")
    for index, point in enumerate(points):
        values = ", ".join(f"{key}={value}" for key, value in point.items())
        print(f"    {index:3d}  pass {batch_of[index]:3d}  {values}")


def prepare(args: argparse.Namespace) -> SweepSettings:
    """Validate everything (file, overrides, data) before anything is created."""
    path = args.study_file or str(DEFAULT_STUDY_FILE)
    overrides = list(args.overrides)
    if args.study_file and "=" in args.study_file and not Path(args.study_file).is_file():
        path, overrides = str(DEFAULT_STUDY_FILE), [args.study_file, *overrides]
    if args.workers < 1:
        raise ConfigError(f"--workers must be 1 or more, got {args.workers}")
    spec = load_study_spec(path, overrides)
    tracking_uri = resolve_tracking_uri(args.tracking_uri or spec.base_config().tracking.uri)
    if "://" not in tracking_uri:
        raise ConfigError(f"--tracking-uri must be a URI such as sqlite:///abs/path.db or http://host:5000, "
                          f"got {tracking_uri!r}")
    check_tracking_store(tracking_uri)
    storage_url = args.storage or store.default_storage_url(tracking_uri, default_store_dir(), spec.name)
    if storage_url == tracking_uri:
        raise ConfigError("--storage must not be the MLflow database: Optuna and MLflow need separate stores")
    check_optuna_storage(storage_url)
    first = spec.grid_points()[0] if spec.is_grid else {}
    resolve_device(spec.trial_config({key: value for key, value in first.items()}).device)
    return SweepSettings(spec=spec, tracking_uri=tracking_uri, storage_url=storage_url, new_study=args.new_study)


def run_sweep(settings: SweepSettings, workers: int = 1, data_cache: DataCache | None = None) -> int:
    """Run (or resume, or join) the study in this process plus `workers - 1` spawned ones.

    A helper that crashes is noticed: its trials are failed and queued again, and this process
    takes them up. The command exits 1 when it leaves the study unfinished after a crash."""
    data_cache = data_cache or DataCache()
    spec = settings.spec
    first = spec.trial_config(spec.grid_points()[0] if spec.is_grid else {})
    data_cache.get(first)  # a missing dataset fails here, before any store is touched

    session = open_session(settings, data_cache)
    helpers = Helpers(worker_process, SweepSettings(**{**vars(settings), "progress": False, "new_study": False}),
                      workers - 1)
    bar = TrialsBar(session, enabled=settings.progress)
    interrupted = False
    try:
        while True:
            work(session, progress=settings.progress and workers == 1, bar=bar)
            crashed = helpers.newly_crashed()
            for helper in crashed:
                tqdm.write(f"worker process {helper.pid} stopped with exit code {helper.exitcode}: "
                           "its trials are failed and queued again")
            if crashed:
                for line in repair_stale_trials(session):
                    tqdm.write(line)
                continue
            if not helpers.alive():
                break
            helpers.wait(timeout=1.0)
            bar.refresh()
    except KeyboardInterrupt as interrupt:
        interrupted = True
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        helpers.stop(terminate=isinstance(interrupt, Interrupted))
    finally:
        bar.refresh()
        bar.close()
    summary = finish_parent(session, interrupted)
    print_results(session, summary)
    if interrupted:
        print("interrupted: the running trials were marked KILLED in MLflow and queued again in Optuna; "
              "rerun the same command to continue them from their checkpoints", file=sys.stderr)
        return 130
    left = unfinished(session)
    if helpers.crashed and left:
        print(f"error: {len(helpers.crashed)} worker process(es) crashed and {left} trial(s) are unfinished; "
              "rerun the same command to finish the study", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None, data_cache: DataCache | None = None) -> int:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    short_http_retries()
    args = build_parser().parse_intermixed_args(argv)
    previous_handler = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        try:
            settings = prepare(args)
            if args.dry_run:
                print_plan(settings)
                return 0
            settings.progress = settings.spec.base_config().train.progress
            return run_sweep(settings, workers=args.workers, data_cache=data_cache)
        except (ConfigError, DataUnavailable) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except StoreUnavailable as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        print("interrupted before the study started; nothing was run", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


if __name__ == "__main__":
    from .cli import exit_now

    exit_now(main())
