"""One tracked training run: `train(config)` from Python, `python -m vae_lab.train` from a shell.

    python -m vae_lab.train model.name=conv_vae model.latent_dim=16 loss.kl_weight=0.8 train.epochs=5
    python -m vae_lab.train --config experiments/runs/pytorch_example_vae.yaml train.seed=3
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .artifacts import write_run_artifacts
from .config import Config, ConfigError, load_config
from .data import DataUnavailable, ImageData, load_data
from .evaluation import evaluate_model
from .losses import kl_to_standard_normal, kl_weight_at, loss_terms, reconstruction_nll
from .models import Autoencoder, build_model
from .tracking import NullTracker, RunTracker, resolve_tracking_uri

EVAL_BATCH_SIZE = 1000


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class RunResult:
    metrics: dict[str, float]
    run_id: str | None
    model: Autoencoder = field(repr=False)


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but this machine has no usable CUDA GPU; use device=auto or device=cpu")
    return torch.device(requested)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate_test(model: Autoencoder, data: ImageData, config: Config, kl_weight: float,
                  device: torch.device) -> dict[str, float]:
    """Test-split metrics, per image in nats, from one posterior sample per image.

    The noise is reseeded on every call, so successive epochs are scored on the same draws.
    """
    model.eval()
    generator = torch.Generator(device=device).manual_seed(config.train.seed + 1_000_003)
    recon_total = kl_total = squared_error = 0.0
    count = 0
    for images, _ in data.batches("test", EVAL_BATCH_SIZE, noise_generator=generator):
        with autocast(device, config.train.amp):
            posterior = model.encode(images)
            logits = model.decode(model.reparameterize(posterior, generator))
        recon_total += reconstruction_nll(logits.float(), images, config.loss.likelihood).sum().item()
        kl_total += kl_to_standard_normal(posterior).float().sum().item()
        squared_error += (torch.sigmoid(logits.float()) - images).square().sum().item()
        count += images.shape[0]
    pixels = math.prod(data.image_shape)
    recon, kl = recon_total / count, kl_total / count
    metrics = {"test/loss": recon + kl_weight * kl, "test/recon": recon,
               "test/mse_per_pixel": squared_error / (count * pixels)}
    if model.variational:
        metrics.update({"test/kl": kl, "test/elbo": -(recon + kl)})
    return metrics


def _check_finite(values: dict[str, float], step: int, epoch: int) -> None:
    bad = {name: value for name, value in values.items() if not math.isfinite(value)}
    if bad:
        name, value = next(iter(bad.items()))
        raise TrainingDiverged(
            f"training diverged: {name} is {value} at step {step} (epoch {epoch}); "
            "try a lower train.lr, train.grad_clip>0 or loss.kl_warmup_steps>0"
        )


def fit(model: Autoencoder, data: ImageData, config: Config, device: torch.device, tracker,
        on_epoch_end: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, float]:
    """The training loop. Returns the last epoch's test metrics and throughput."""
    train_cfg, loss_cfg = config.train, config.loss
    optimizer = torch.optim.Adam(model.parameters(), lr=train_cfg.lr)
    order_generator = torch.Generator().manual_seed(train_cfg.seed)
    noise_generator = torch.Generator(device=device).manual_seed(train_cfg.seed + 1)
    steps_per_epoch = data.num_batches("train", train_cfg.batch_size)
    log_every = config.tracking.log_every_steps
    step = 0
    metrics: dict[str, float] = {}

    for epoch in range(1, train_cfg.epochs + 1):
        model.train()
        running = torch.zeros(3, device=device)  # sums of loss, recon, kl since the last log
        running_count = 0
        started = time.perf_counter()
        bar = tqdm(data.batches("train", train_cfg.batch_size, shuffle=True, generator=order_generator,
                                noise_generator=noise_generator),
                   total=steps_per_epoch, desc=f"epoch {epoch}/{train_cfg.epochs}", leave=False,
                   disable=not train_cfg.progress, dynamic_ncols=True)
        for images, _ in bar:
            kl_weight = kl_weight_at(step, loss_cfg.kl_weight, loss_cfg.kl_warmup_steps)
            with autocast(device, train_cfg.amp):
                output = model(images, noise_generator)
            terms = loss_terms(output.logits, images, output.posterior, loss_cfg.likelihood, kl_weight)
            optimizer.zero_grad(set_to_none=True)
            terms.loss.backward()
            if train_cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
            optimizer.step()
            step += 1
            with torch.no_grad():
                running += torch.stack([terms.loss.detach() * images.shape[0],
                                        terms.recon.detach().sum(), terms.kl.detach().sum()])
            running_count += images.shape[0]
            if step % log_every == 0 or step % steps_per_epoch == 0:
                loss, recon, kl = (running / running_count).tolist()  # the one host sync
                logged = {"train/loss": loss, "train/recon": recon}
                if model.variational:
                    logged.update({"train/kl": kl, "train/kl_weight": kl_weight})
                _check_finite(logged, step, epoch)
                tracker.log_metrics(logged, step)
                bar.set_postfix(loss=f"{loss:.2f}")
                running.zero_()
                running_count = 0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        bar.close()

        metrics = evaluate_test(model, data, config, loss_cfg.kl_weight, device)
        _check_finite(metrics, step, epoch)
        metrics["train/images_per_sec"] = data.train_images.shape[0] / seconds
        metrics["train/epoch_seconds"] = seconds
        tracker.log_metrics({**metrics, "epoch": epoch}, step)
        tracker.flush()
        if train_cfg.progress:
            tqdm.write(f"epoch {epoch}/{train_cfg.epochs}  test/loss {metrics['test/loss']:.2f}  "
                       f"test/recon {metrics['test/recon']:.2f}  "
                       f"{metrics['train/images_per_sec']:.0f} img/s")
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)
    return metrics


def finalize_run(model: Autoencoder, data: ImageData, config: Config, device: torch.device,
                 tracker, metrics: dict[str, float]) -> dict[str, float]:
    """After training: evaluation metrics, artifacts, the model, and the run ended FINISHED.
    Returns the metrics with the `eval/` ones added."""
    metrics = dict(metrics)
    evaluation = evaluate_model(model, data, config, device) if config.eval.enabled else None
    if evaluation is not None:
        metrics.update(evaluation.metrics)
        tracker.log_metrics(evaluation.metrics, step=0)
        tracker.set_tags(evaluation.tags)
    if config.tracking.enabled:
        with tempfile.TemporaryDirectory() as folder:
            write_run_artifacts(model, data, config, Path(folder), evaluation,
                                images=config.tracking.log_images)
            tracker.log_artifacts(Path(folder))
        if config.tracking.log_model:
            tracker.finish_with_model(model)
    tracker.end("FINISHED")
    return metrics


def run_status_for(error: BaseException) -> str:
    """MLflow status for a run stopped by `error`: interrupted or pruned runs are KILLED."""
    import optuna

    if isinstance(error, (KeyboardInterrupt, optuna.TrialPruned)):
        return "KILLED"
    return "FAILED"


def train(config: Config, *, parent_run_id: str | None = None, run_name: str | None = None,
          tags: dict[str, str] | None = None, data: ImageData | None = None,
          on_epoch_end: Callable[[int, dict[str, float]], None] | None = None) -> RunResult:
    """Train one model as one MLflow run and return its final metrics.

    The data is loaded (and so can fail) before any run is created. Whatever stops the
    run, it ends FINISHED, FAILED (an error, a diverged loss) or KILLED (Ctrl-C, pruned),
    never RUNNING; the error is re-raised after the status is written.
    """
    device = resolve_device(config.device)
    if data is None:
        data = load_data(config.data, device)
    seed_everything(config.train.seed)
    model = build_model(config.model, data.image_shape).to(device)
    tracker = RunTracker.start(config, device, parent_run_id, run_name, tags) \
        if config.tracking.enabled else NullTracker()
    try:
        metrics = fit(model, data, config, device, tracker, on_epoch_end)
        metrics = finalize_run(model, data, config, device, tracker, metrics)
    except BaseException as error:
        tracker.end(run_status_for(error), reason=f"{type(error).__name__}: {error}")
        raise
    return RunResult(metrics=metrics, run_id=tracker.run_id, model=model.to(device))


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
    try:
        config = load_config(args.config, args.overrides)
        device = resolve_device(config.device)
        data = load_data(config.data, device)
    except (ConfigError, DataUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
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
    sys.exit(main())
