"""After training: evaluation metrics, artifacts, the model, and the run ended FINISHED."""

from __future__ import annotations

import collections
import contextlib
import tempfile
import time
from pathlib import Path

import torch

from vae_lab.config import Config
from vae_lab.data.datasets import ImageData
from vae_lab.evaluation import latent_evolution
from vae_lab.models.autoencoders import Autoencoder

# Seconds this process spent on each stage of its runs' ends, summed over runs: what
# benchmarks/sweep.py and benchmarks/single_run.py break the end of a run down by.
END_OF_RUN_SECONDS: collections.Counter = collections.Counter()


@contextlib.contextmanager
def end_of_run_stage(name: str):
    started = time.perf_counter()
    try:
        yield
    finally:
        END_OF_RUN_SECONDS[name] += time.perf_counter() - started


def finalize_run(model: Autoencoder, data: ImageData, config: Config, device: torch.device,
                 tracker, metrics: dict[str, float], latent_frames=None) -> dict[str, float]:
    """After training: evaluation metrics, artifacts, the model, and the run ended FINISHED.
    `latent_frames` ((step, means) list, labels) become latents/evolution.gif.
    Returns the metrics with the `eval/` ones added."""
    # imported here: they bring matplotlib, torchvision and scikit-learn (about 2 s), which a
    # process that never finishes a run (a bad argument, --dry-run, a study's start) does not need
    from vae_lab.evaluation.artifacts import write_run_artifacts
    from vae_lab.evaluation.metrics import evaluate_model

    metrics = dict(metrics)
    with end_of_run_stage("eval/*"):
        evaluation = evaluate_model(model, data, config, device) if config.eval.enabled else None
    if evaluation is not None:
        metrics.update(evaluation.metrics)
        tracker.log_metrics(evaluation.metrics, step=0)
        tracker.log_tags(evaluation.tags)
    if config.tracking.enabled:
        with tempfile.TemporaryDirectory() as folder:
            with end_of_run_stage("images and latents"):
                write_run_artifacts(model, data, config, Path(folder), evaluation, images=config.tracking.log_images)
            if latent_frames is not None:
                with end_of_run_stage("latents/evolution.gif"):
                    latent_evolution.save_evolution(*latent_frames, Path(folder) / "latents" / "evolution.gif",
                                                    class_names=data.class_names)
            with end_of_run_stage("artifact upload"):
                tracker.log_artifacts(Path(folder))
        if config.tracking.log_model:
            with end_of_run_stage("model"):
                tracker.finish_with_model(model)
    with end_of_run_stage("run end"):
        tracker.end("FINISHED")
    return metrics
