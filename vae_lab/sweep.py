"""Studies over run configs: a grid or an Optuna search, one MLflow parent run + one child per trial.

    python -m vae_lab.sweep                                   # experiments/default.yaml
    python -m vae_lab.sweep experiments/seed000_nas.yaml
    python -m vae_lab.sweep experiments/latent_kl_optuna.yaml study.n_trials=40 base.train.epochs=20
    python -m vae_lab.sweep experiments/latent_kl_optuna.yaml --workers 2
    python -m vae_lab.sweep FILE --storage postgresql://... --tracking-uri http://mlflow-host:5000
    python -m vae_lab.sweep FILE --launcher slurm --workers 32 --slurm partition=gpu,time=04:00:00 \
        --storage postgresql://USER@DBHOST/optuna --tracking-uri http://mlflow-host:5000 [--wait]

Running the same command again resumes the study, whatever stopped it (Ctrl-C, kill -9, a
store that was down): trials its stopped workers left are continued from their checkpoints
in their own MLflow runs. Commands with any `--workers` on one store join one study; the
Optuna storage is the source of truth for which trials exist, and a grid's points are
claimed there atomically, so several workers (processes or machines) never run one point twice.

With `--launcher slurm` the command creates (or joins) the study and its parent run, submits one
Slurm job array of `--workers` tasks, each running the same worker loop (`vae_lab.study.slurm`),
prints the job id and returns; `--wait` follows the array and ends with the usual summary.

The study itself lives in `vae_lab.study` (see its package doc); this module is the command:
arguments, validation before anything is created, and what it prints.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import optuna

from vae_lab import names
from vae_lab.cli import shell_command
from vae_lab.config import ConfigError
from vae_lab.data.cache import DataCache
from vae_lab.data.datasets import DataUnavailable
from vae_lab.study import storage as store
from vae_lab.study import slurm
from vae_lab.study.progress import TrialsBar
from vae_lab.study.runner import check_without_creating, finish_parent, open_session, run_study, unfinished
from vae_lab.study.session import Session, SweepSettings
from vae_lab.study.spec import Choices, load_study_spec, point_label
from vae_lab.tracking.checks import check_tracking_store, refused_by_server, short_http_retries
from vae_lab.study.workers import heartbeat_seconds
from vae_lab.tracking.errors import StoreUnavailable, describe, is_store_error, store_patience_seconds
from vae_lab.tracking.links import browse_lines
from vae_lab.tracking.uris import default_store_dir, redact, resolve_tracking_uri
from vae_lab.training.batching import plan_batches
from vae_lab.training.device import resolve_device
from vae_lab.interrupts import interruptible

__all__ = ["main", "run_sweep"]

DEFAULT_STUDY_FILE = Path(__file__).resolve().parents[1] / "experiments" / "default.yaml"


# ----------------------------------------------------------------------------- the command

def print_results(session: Session, summary: dict) -> None:
    settings, counts = session.settings, summary["counts"]
    retried = f" ({counts['retried']} stopped and continued by a retry)" if counts.get("retried") else ""
    print(f"\nstudy {session.spec.name!r}: {counts['complete']} complete, {counts['pruned']} pruned, "
          f"{counts['failed']} failed{retried}, {counts['running'] + counts['waiting']} left "
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
        print(f"pareto: trial {entry['number']}, {point_label(entry['params']) or 'the base config'} ({values})")
    experiment = session.spec.base_config().tracking.experiment
    print(f"results: MLflow experiment {experiment!r}, parent run {session.parent_run_id} "
          f"(study/trials.csv, study/summary.json)")
    experiment_id = session.client.get_run(session.parent_run_id).info.experiment_id
    print("\n".join(browse_lines(settings.tracking_uri, experiment_id, session.parent_run_id, "parent")))
    print(f"  report:  {shell_command('python')} -m analysis.report --run {session.parent_run_id}")
    print(f"  optuna:  study {session.spec.name!r} in {redact(settings.storage_url)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vae_lab.sweep",
        description="Run a study (grid or Optuna search) of AE/VAE trainings, tracked in MLflow. "
                    "Running the same command again resumes it.",
        epilog="Overrides: study.n_trials=40 base.train.epochs=20 search_space.model.latent_dim=[2,8]")
    parser.add_argument("study_file", nargs="?", default=None,
                        help=f"study YAML (default: {DEFAULT_STUDY_FILE.relative_to(DEFAULT_STUDY_FILE.parents[1])})")
    parser.add_argument("overrides", nargs="*", help="section.key=value, sections study, base, search_space")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes on this machine, or array tasks with --launcher slurm (default 1)")
    parser.add_argument("--launcher", default="local", metavar="{local,slurm}",
                        help="where the workers run: here (default), or as one Slurm job array")
    parser.add_argument("--slurm", default="", metavar="KEY=VALUE,...",
                        help="Slurm options for --launcher slurm: partition=gpu,time=04:00:00,gpus_per_task=1,"
                             "cpus_per_task=4,array_parallelism=8 (at most 8 tasks at once), any sbatch option")
    parser.add_argument("--slurm-folder", default="", help="the job's script and logs, on a filesystem the nodes "
                        "share (default ./slurm/STUDY)")
    parser.add_argument("--wait", action="store_true",
                        help="with --launcher slurm: follow the job array's progress and print the summary")
    parser.add_argument("--storage", default="", help="Optuna storage URL (default: a file beside the MLflow store)")
    parser.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: base.tracking.uri, "
                        "$MLFLOW_TRACKING_URI, else mlruns/mlflow.db)")
    parser.add_argument("--new-study", action="store_true",
                        help="start the study over even if one with this name is stored (its MLflow runs stay)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the file and list the trials it would run; create and run nothing")
    return parser


LAUNCHERS = ("local", "slurm")
PLAN_LISTS_UP_TO = 1000  # grid points listed (and planned into passes) by --dry-run


def print_plan(settings: SweepSettings) -> None:
    """What a study would run: its grid points (with their batches), or its sampled space."""
    spec = settings.spec
    print(f"study {spec.name!r}: sampler {spec.sampler}, pruner {spec.pruner}, objectives "
          + ", ".join(str(objective) for objective in spec.objectives))
    print(f"  MLflow: {redact(settings.tracking_uri)}   Optuna: {redact(settings.storage_url)}")
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
    size = spec.grid_size()
    points = list(itertools.islice(spec.iter_grid_points(), PLAN_LISTS_UP_TO))
    configs = [spec.trial_config(point) for point in points]
    batches = plan_batches(configs, spec.batch_trials) if spec.batches_trials else [[index] for index in range(len(points))]
    batch_of = {index: number for number, batch in enumerate(batches) for index in batch}
    passes = f"{len(batches)} training passes" if size == len(points) else f"the first {len(points)} in {len(batches)} passes"
    print(f"  {size:,} grid points, {passes} (study.batch_trials={spec.batch_trials}):")
    for index, point in enumerate(points):
        values = ", ".join(f"{key}={value}" for key, value in point.items())
        print(f"    {index:3d}  pass {batch_of[index]:3d}  {values}")
    if size > len(points):
        print(f"    ... and {size - len(points):,} more")


def prepare(args: argparse.Namespace) -> SweepSettings:
    """Validate everything (file, overrides, data) before anything is created."""
    path = args.study_file or str(DEFAULT_STUDY_FILE)
    overrides = list(args.overrides)
    if args.study_file and "=" in args.study_file and not Path(args.study_file).is_file():
        path, overrides = str(DEFAULT_STUDY_FILE), [args.study_file, *overrides]
    if args.workers < 1:
        raise ConfigError(f"--workers must be 1 or more, got {args.workers}")
    if args.launcher not in LAUNCHERS:
        raise ConfigError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {args.launcher!r}")
    if args.launcher != "slurm" and (args.slurm or args.slurm_folder or args.wait):
        raise ConfigError("--slurm, --slurm-folder and --wait go with --launcher slurm")
    store_patience_seconds(), heartbeat_seconds()  # ConfigError for a bad $VAE_LAB_* value
    spec = load_study_spec(path, overrides)
    tracking_uri = resolve_tracking_uri(args.tracking_uri or spec.base_config().tracking.uri)
    if "://" not in tracking_uri:
        raise ConfigError(f"--tracking-uri must be a URI such as sqlite:///abs/path.db or http://host:5000, "
                          f"got {tracking_uri!r}")
    storage_url = args.storage or store.default_storage_url(tracking_uri, default_store_dir(), spec.name)
    if storage_url == tracking_uri:
        raise ConfigError("--storage must not be the MLflow database: Optuna and MLflow need separate stores")
    settings = SweepSettings(spec=spec, tracking_uri=tracking_uri, storage_url=storage_url, new_study=args.new_study)
    if args.launcher == "slurm":
        slurm.check_can_submit(settings, storage_given=bool(args.storage))
        args.slurm_parameters = slurm.slurm_options(args.slurm)
    check_tracking_store(tracking_uri)
    store.check_optuna_storage(storage_url)
    if args.launcher == "local":  # the workers run here: the trials' device must exist here
        first = next(spec.iter_grid_points()) if spec.is_grid else {}
        resolve_device(spec.trial_config({key: value for key, value in first.items()}).device)
    return settings


def run_sweep(settings: SweepSettings, workers: int = 1, data_cache: DataCache | None = None) -> int:
    """Run the study (`runner.run_study`), print how it ended; the command's exit code
    (1 when crashed helpers leave it unfinished, 130 when interrupted)."""
    outcome = run_study(settings, workers=workers, data_cache=data_cache)
    print_results(outcome.session, outcome.summary)
    if outcome.interrupted:
        print("interrupted: the running trials were marked KILLED in MLflow and queued again in Optuna; "
              "rerun the same command to continue them from their checkpoints", file=sys.stderr)
        return 130
    if outcome.crashed_helpers and outcome.unfinished:
        print(f"error: {outcome.crashed_helpers} worker process(es) crashed and {outcome.unfinished} trial(s) are "
              "unfinished; rerun the same command to finish the study", file=sys.stderr)
        return 1
    return 0


def format_options(parameters: dict) -> str:
    flat = {**{key: value for key, value in parameters.items() if key != "additional_parameters"},
            **parameters.get("additional_parameters", {})}
    return ", ".join(key if value is True else f"{key}={value}" for key, value in flat.items())


def submit_to_slurm(settings: SweepSettings, args: argparse.Namespace) -> int:
    """Create or join the study, submit its workers as one Slurm array; with --wait, follow it to
    the end and print the summary (exit 1 when the array ended with trials left)."""
    session = open_session(settings)
    folder = Path(args.slurm_folder).resolve() if args.slurm_folder else slurm.default_folder(settings.spec.name)
    try:
        array = slurm.submit_array(settings, args.workers, args.slurm_parameters, folder)
    except Exception as error:  # sbatch refused it (an option, a partition, a limit): nothing was submitted
        reason = (getattr(error, "stderr", None) or getattr(error, "output", None) or str(error))
        reason = reason.decode(errors="replace") if isinstance(reason, bytes) else str(reason)
        lines = [line for line in reason.splitlines() if line.strip()]
        raise ConfigError(f"sbatch refused the job array: {lines[-1] if lines else type(error).__name__}") from None
    print(f"submitted Slurm job array {array.job_id}: {array.tasks} workers of study {settings.spec.name!r}")
    print(f"  watch:   squeue -j {array.job_id}        logs: {array.logs}")
    print(f"  stop:    scancel {array.job_id}   (a rerun of this command resumes the study)")
    experiment_id = session.client.get_run(session.parent_run_id).info.experiment_id
    print("\n".join(browse_lines(settings.tracking_uri, experiment_id, session.parent_run_id, "parent")))
    if not args.wait:
        return 0
    bar = TrialsBar(session, enabled=True)
    try:
        slurm.wait_for_array(array, bar)
    except KeyboardInterrupt:
        bar.close()
        print(f"stopped waiting; job array {array.job_id} goes on (scancel {array.job_id} stops it)", file=sys.stderr)
        return 130
    bar.close()
    summary = finish_parent(session, interrupted=False)
    print_results(session, summary)
    left = unfinished(session)
    if left:
        print(f"error: job array {array.job_id} ended with {left} trial(s) unfinished (see {array.logs}); "
              "rerun the same command to submit workers again", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None, data_cache: DataCache | None = None) -> int:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    short_http_retries()
    args = build_parser().parse_intermixed_args(argv)
    try:
        with interruptible():
            return _run_command(args, data_cache)
    except KeyboardInterrupt:
        print("interrupted before the study started; nothing was run", file=sys.stderr)
        return 130


def _run_command(args: argparse.Namespace, data_cache: DataCache | None) -> int:
    settings = None
    try:
        settings = prepare(args)
        if args.dry_run:
            check_without_creating(settings)  # refuses what the run would refuse
            print_plan(settings)
            if args.launcher == "slurm":
                print(f"  would submit one Slurm job array of {args.workers} tasks with "
                      f"{format_options(args.slurm_parameters) or 'the cluster defaults'}")
            return 0
        settings.progress = settings.spec.base_config().train.progress
        if args.launcher == "slurm":
            return submit_to_slurm(settings, args)
        return run_sweep(settings, workers=args.workers, data_cache=data_cache)
    except (ConfigError, DataUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except StoreUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:
        refused = refused_by_server(error, settings.tracking_uri) if settings is not None else None
        if refused is not None:  # after the start check: a password changed, a user who may only read
            print(f"error: {refused}", file=sys.stderr)
            return 2
        if not is_store_error(error):
            raise
        print(f"error: a store could not be written or reached ({describe(error)}); rerun the same command "
              "once it is back: every trial continues from its checkpoint", file=sys.stderr)
        return 1


if __name__ == "__main__":
    from vae_lab.cli import exit_now

    exit_now(main())
