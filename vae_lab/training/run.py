"""The one way to train: a list of trial specs in, one outcome per spec out. A single run is a
list of one; trials of one shape (`batching.batch_key`) train together in one pass.

    outcomes = run_trials([TrialSpec(config, run_name="...", tags={...}), ...], data=data)
    # -> a RunResult (or the exception that stopped it) per spec, in order

Each trial has its own MLflow run (a child of `parent_run_id` when given). `TrialSpec.resume`
continues that run from its checkpoint instead of starting one; trials trained together resume
from one epoch. `on_trial_end(index, outcome)` is called as each trial ends. KeyboardInterrupt
ends every open run KILLED and is re-raised with `.outcomes` (those that ended before it).
An error of the shared pass itself (out of memory, a bug) ends every open run FAILED and is
returned for each.
"""

from __future__ import annotations

from typing import Sequence

from vae_lab import names
from vae_lab.config import ConfigError
from vae_lab.data.datasets import ImageData
from vae_lab.models.components import build_model
from vae_lab.training import padding
from vae_lab.training.batching import PER_TRIAL_KEYS, batch_key
from vae_lab.training.device import (
    applied_threads,
    effective_amp,
    fit_threads_to_load,
    resolve_device,
    seed_everything,
)
from vae_lab.training.loop import Engine
from vae_lab.training.trial import RunResult, Trial, TrialEndCallback, TrialSpec


def check_batchable(specs: Sequence[TrialSpec]) -> None:
    """ValueError naming the keys that keep these trials from training in one pass."""
    keys = [batch_key(spec.config) for spec in specs]
    if any(key != keys[0] for key in keys):
        first = dict(keys[0])
        differing = sorted({name for key in keys for name, value in key if first.get(name, object()) != value})
        raise ValueError("trials trained together may differ only in "
                         f"{', '.join(PER_TRIAL_KEYS)} (and, where their family pads exactly, in "
                         f"{' and '.join(padding.SIZE_KEYS)} at one depth); these differ too: {', '.join(differing)}")
    configs = [spec.config for spec in specs]
    if padding.sizes_differ(configs) and not all(padding.loss_pads(config) for config in configs):
        raise ValueError("trials of different sizes train together only without loss.free_bits and "
                         "loss.tc_weight (they act on every latent dimension, padded ones too)")
    if len({spec.resumed_epoch for spec in specs}) > 1:
        raise ValueError("trials trained together must resume from the same epoch")


def run_trials(specs: Sequence[TrialSpec], *, data: ImageData, parent_run_id: str | None = None,
               on_trial_end: TrialEndCallback | None = None,
               stacked: bool | None = None) -> list[RunResult | BaseException]:
    """Train `specs` in one pass; one MLflow run and one outcome each (see the module's doc).
    `stacked` picks the step: by default a plain step for one spec and a vmapped one for
    several (`stacked=True` with one spec is the batch of one the tests compare with the
    plain step)."""
    specs = list(specs)
    if not specs:
        return []
    check_batchable(specs)
    first = specs[0].config
    device = resolve_device(first.device)
    data = data.to(device)  # data a caller loaded elsewhere (train(config, data=...)) trains where the run does
    if data.train_images.shape[0] < first.train.batch_size:
        raise ConfigError(f"train.batch_size={first.train.batch_size} is larger than the "
                          f"{data.train_images.shape[0]} training images")
    if any(spec.config.train.early_stopping_patience for spec in specs) and not data.has_val:
        raise ConfigError("train.early_stopping_patience needs a validation split; set data.val_size")

    trials = [Trial(index, spec) for index, spec in enumerate(specs)]
    for trial in trials:
        seed_everything(trial.config.train.seed)
        trial.model = build_model(trial.config.model, data.image_shape, trial.config.prior).to(device)
        if trial.checkpoint is not None:
            trial.model.load_state_dict(trial.checkpoint.model_state)
            trial.restore(trial.checkpoint, device)
    amp = effective_amp(first.train.amp, device)
    if device.type == "cpu":
        fit_threads_to_load()  # this pass's threads: the CPUs other processes leave (tagged below)
    configs = [spec.config for spec in specs]
    padded_to = padding.describe_sizes(padding.widest(configs)) if padding.sizes_differ(configs) else None
    try:
        try:
            for trial in trials:
                start_tracking(trial, data, device, parent_run_id, amp, batched=len(trials), padded_to=padded_to)
            # StackedStep groups trials by learning rate: keep equal rates next to each other
            ordered = sorted(trials, key=lambda trial: trial.config.train.lr)
            engine = Engine(ordered, data, device, stacked=len(trials) > 1 if stacked is None else stacked, amp=amp,
                            on_trial_end=on_trial_end)
            engine.run()
        except Exception as error:  # the shared pass (or its setup) failed: every trial still open fails
            for trial in trials:
                if trial.outcome is None:
                    if trial.tracker is not None:
                        trial.tracker.end("FAILED", reason=f"{type(error).__name__}: {error}")
                    trial.outcome = error
                    if on_trial_end is not None:
                        on_trial_end(trial.index, error)
    except KeyboardInterrupt as error:
        for trial in trials:
            if trial.tracker is not None:
                trial.tracker.end("KILLED", reason=f"{type(error).__name__}: {error}", resumable=True)
        # the trials that ended before the interrupt keep their outcome (FINISHED runs, pruned)
        error.outcomes = [trial.outcome for trial in trials]
        raise
    return [trial.outcome for trial in trials]


def start_tracking(trial: Trial, data: ImageData, device, parent_run_id: str | None, amp: bool,
                   batched: int, padded_to: str | None = None) -> None:
    """The trial's run: none with tracking off, its own run continued, or a new one."""
    from vae_lab.tracking.tracker import NullTracker, RunTracker  # MLflow (about 1 s): only once a run starts

    spec = trial.spec
    run_tags = {names.PRECISION_TAG: "bf16 autocast" if amp else "fp32", **spec.tags}
    if device.type == "cpu":
        run_tags[names.THREADS_TAG] = applied_threads()
    if trial.model is not None and trial.model.variational:
        run_tags[names.KL_ESTIMATOR_TAG] = trial.model.prior.estimator
    if batched > 1:
        run_tags[names.BATCHED_TRIALS_TAG] = str(batched)
    if padded_to is not None:
        run_tags[names.PADDED_TO_TAG] = padded_to
    if not trial.config.tracking.enabled:
        trial.tracker = NullTracker()
    elif spec.resume is not None:
        trial.tracker = RunTracker.resume(trial.config, spec.resume.run_id, run_tags, trial.checkpoint)
    else:
        trial.tracker = RunTracker.start(trial.config, device, parent_run_id, spec.run_name, run_tags)
        trial.tracker.log_datasets(data)
