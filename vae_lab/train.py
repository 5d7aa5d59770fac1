"""One tracked training run: `train(config)` from Python, `python -m vae_lab.train` from a shell.

    python -m vae_lab.train model.name=conv_vae model.latent_dim=16 loss.kl_weight=0.8 train.epochs=5
    python -m vae_lab.train --config experiments/runs/pytorch_example_vae.yaml train.seed=3
    python -m vae_lab.train train.epochs=300 train.early_stopping_patience=10
    python -m vae_lab.train train.epochs=300 train.checkpoint_every=5   # then, if it is killed:
    python -m vae_lab.train --resume RUN_ID                              # continues that run

A run is a batch of one in the one training loop (`vae_lab.training.run.run_trials`): val/* every epoch, test/* once at the
end (from the best epoch's weights under early stopping), then eval/*, images, latents, model.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from vae_lab.config import Config, ConfigError, load_config


def train(config: Config, *, parent_run_id: str | None = None, run_name: str | None = None,
          tags: dict[str, str] | None = None, data=None,
          on_epoch_end: Callable[[int, dict[str, float]], None] | None = None, resume=None):
    """Train one model as one MLflow run and return its `RunResult` (final metrics, run id, model).
    `resume` (a `vae_lab.training.checkpoints.Resume`) continues that run from its checkpoint instead.

    The data is loaded (and so can fail) before any run is created. Whatever stops the
    run, it ends FINISHED, FAILED (an error, a diverged loss) or KILLED (Ctrl-C, pruned),
    never RUNNING; the error is re-raised after the status is written.
    """
    from vae_lab.data.datasets import load_data
    from vae_lab.training.device import resolve_device
    from vae_lab.training.run import run_trials
    from vae_lab.training.trial import TrialSpec

    if data is None:
        data = load_data(config.data, resolve_device(config.device), config.train.batch_size)
    spec = TrialSpec(config, run_name=run_name, tags=dict(tags or {}), resume=resume, on_epoch_end=on_epoch_end)
    (outcome,) = run_trials([spec], data=data, parent_run_id=parent_run_id, stacked=False)
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome




def resumable_run(run_id: str, config_file: str | None, overrides: list[str]):
    """The config and checkpoint of run `run_id`, or ConfigError saying why it cannot continue."""
    import mlflow

    from vae_lab.training.checkpoints import HOW_IT_RUNS, Resume, read_checkpoint
    from vae_lab.config import apply_overrides, parse_override
    from vae_lab.tracking.checks import StoreUnreachable, check_tracking_store, missing_store, short_http_retries
    from vae_lab.tracking.errors import is_store_error
    from vae_lab.tracking.logged import load_run_config
    from vae_lab.tracking.uris import redact, resolve_tracking_uri

    if config_file:
        raise ConfigError("--resume continues a run with the config it was started with; drop --config")
    keys = [parse_override(text)[0] for text in overrides]
    refused = [key for key in keys if key not in HOW_IT_RUNS]
    if refused:
        raise ConfigError(f"--resume continues a run with the config it was started with; {refused[0]} cannot "
                          f"change (allowed: {', '.join(HOW_IT_RUNS)})")
    uri = resolve_tracking_uri(dict(parse_override(text) for text in overrides).get("tracking.uri", ""))
    problem = missing_store(uri)
    if problem:
        raise ConfigError(problem)
    short_http_retries()
    check_tracking_store(uri)  # "store unreachable" is its own answer, not "no run" or "no checkpoint"
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException as error:
        if is_store_error(error):
            raise StoreUnreachable(f"cannot reach the MLflow store {redact(uri)}: "
                                   f"{str(error).splitlines()[0][:200]}") from None
        raise ConfigError(f"no run {run_id!r} in {redact(uri)}") from None
    if run.info.status == "FINISHED":
        raise ConfigError(f"run {run_id} already FINISHED; nothing to resume")
    config = apply_overrides(load_run_config(client, run_id), [*overrides, f"tracking.uri={uri}"])
    try:
        found = read_checkpoint(client, run_id, config)
    except Exception as error:
        if not is_store_error(error):
            raise
        raise StoreUnreachable(f"cannot read the checkpoints of run {run_id} from {redact(uri)}: "
                               f"{str(error).splitlines()[0][:200]}; rerun once the store is back") from None
    if found.checkpoint is None and not found.problems:
        raise ConfigError(f"run {run_id} has no checkpoint to continue from (it trained with "
                          "train.checkpoint_every=0, or was stopped before its first one)")
    if found.checkpoint is None:
        raise ConfigError(f"run {run_id} cannot continue: its checkpoints are corrupt ({found.why_none()}); "
                          "train it again without --resume")
    for problem in found.problems:
        print(f"note: run {run_id}: {problem}; continuing from the other slot (epoch {found.checkpoint.epoch})",
              file=sys.stderr)
    return config, Resume(run_id, found.checkpoint)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vae_lab.train",
        description="Train one AE/VAE and log it to MLflow.",
        epilog="Overrides are dotted keys, e.g. model.name=conv_vae model.latent_dim=16 loss.kl_weight=0.8",
    )
    parser.add_argument("--config", help="a run config YAML (sections data, model, loss, train, eval, tracking)")
    parser.add_argument("--resume", metavar="RUN_ID",
                        help="continue a killed run from its checkpoint (it trained with train.checkpoint_every)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    from vae_lab.data.datasets import DataUnavailable, load_data
    from vae_lab.models.components import check as check_components
    from vae_lab.tracking.checks import check_tracking_store, refused_by_server
    from vae_lab.tracking.errors import store_patience_seconds
    from vae_lab.tracking.uris import resolve_tracking_uri
    from vae_lab.training.device import apply_threads, plan_threads, resolve_device

    resume = None
    try:
        store_patience_seconds()  # a bad $VAE_LAB_STORE_PATIENCE_SECONDS: one line now, not mid-run
        if args.resume:
            config, resume = resumable_run(args.resume, args.config, args.overrides)
        else:
            config = load_config(args.config, args.overrides)
        check_components(config)
        if config.tracking.enabled and resume is None:  # resumable_run has checked it
            check_tracking_store(resolve_tracking_uri(config.tracking.uri))
        device = resolve_device(config.device)
        apply_threads(plan_threads(config.threads))
        data = load_data(config.data, device, config.train.batch_size)
    except (ConfigError, DataUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from vae_lab.interrupts import interruptible
    from vae_lab.training.trial import TrainingDiverged

    try:
        with interruptible():
            result = train(config, data=data, resume=resume)
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:
        refused = refused_by_server(error, resolve_tracking_uri(config.tracking.uri))
        if refused is None:
            raise
        print(f"error: {refused}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the run was marked KILLED", file=sys.stderr)
        return 130
    uri = resolve_tracking_uri(config.tracking.uri)
    print("final metrics:")
    for key, value in sorted(result.metrics.items()):
        print(f"  {key:28s} {value:.4f}")
    print(f"run {result.run_id} in experiment {config.tracking.experiment!r}")
    if config.tracking.enabled:
        from mlflow.tracking import MlflowClient

        from vae_lab.tracking.links import browse_lines

        experiment_id = MlflowClient(tracking_uri=uri).get_run(result.run_id).info.experiment_id
        print("\n".join(browse_lines(uri, experiment_id, result.run_id, "run")))
    return 0


if __name__ == "__main__":
    from vae_lab.cli import exit_now

    exit_now(main())
