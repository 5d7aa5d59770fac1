"""One tracked training run: `train(config)` from Python, `python -m vae_lab.train` from a shell.

    python -m vae_lab.train model.name=conv_vae model.latent_dim=16 loss.kl_weight=0.8 train.epochs=5
    python -m vae_lab.train --config experiments/runs/pytorch_example_vae.yaml train.seed=3
    python -m vae_lab.train train.epochs=300 train.early_stopping_patience=10

A run is a batch of one in the engine (`vae_lab.engine`): val/* every epoch, test/* once at the
end (from the best epoch's weights under early stopping), then eval/*, images, latents, model.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Callable

from .config import Config, ConfigError, load_config


def train(config: Config, *, parent_run_id: str | None = None, run_name: str | None = None,
          tags: dict[str, str] | None = None, data=None,
          on_epoch_end: Callable[[int, dict[str, float]], None] | None = None):
    """Train one model as one MLflow run and return its `RunResult` (final metrics, run id, model).

    The data is loaded (and so can fail) before any run is created. Whatever stops the
    run, it ends FINISHED, FAILED (an error, a diverged loss) or KILLED (Ctrl-C, pruned),
    never RUNNING; the error is re-raised after the status is written.
    """
    from .data import load_data
    from .engine import resolve_device, train_group

    device = resolve_device(config.device)
    if data is None:
        data = load_data(config.data, device, config.train.batch_size)
    (outcome,) = train_group([config], data=data, device=device, parent_run_id=parent_run_id,
                             run_names=[run_name], tags=[tags], on_epoch_end=[on_epoch_end], stacked=False)
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _interrupt_on_sigterm(signum, frame):
    raise KeyboardInterrupt("SIGTERM")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vae_lab.train",
        description="Train one AE/VAE and log it to MLflow.",
        epilog="Overrides are dotted keys, e.g. model.name=conv_vae model.latent_dim=16 loss.kl_weight=0.8",
    )
    parser.add_argument("--config", help="a run config YAML (sections data, model, loss, train, eval, tracking)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    from .data import DataUnavailable, load_data
    from .engine import resolve_device

    try:
        config = load_config(args.config, args.overrides)
        device = resolve_device(config.device)
        data = load_data(config.data, device, config.train.batch_size)
    except (ConfigError, DataUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from .engine import TrainingDiverged
    from .tracking import resolve_tracking_uri

    signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    try:
        result = train(config, data=data)
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the run was marked KILLED", file=sys.stderr)
        return 130
    uri = resolve_tracking_uri(config.tracking.uri)
    print("final metrics:")
    for key, value in sorted(result.metrics.items()):
        print(f"  {key:28s} {value:.4f}")
    print(f"run {result.run_id} in experiment {config.tracking.experiment!r}")
    print(f"browse it:  mlflow ui --backend-store-uri {uri}")
    return 0


if __name__ == "__main__":
    from .cli import exit_now

    exit_now(main())
