"""Running a study's trials: the worker loop, and the claimed trials trained through the one
entry point (`vae_lab.training.run.run_trials`), in batches where their shapes allow.

    work(worker, progress)     # ask, run, tell, until the study has nothing left for this worker

Each trial keeps its own Optuna trial and MLflow child run, and is told (`outcomes.record_outcome`)
as soon as its run ends. A retry continues its stopped run from the run's checkpoint
(`prepare_trial`).
"""

from __future__ import annotations

import contextlib
import json

import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from vae_lab import names
from vae_lab.study import storage as store
from vae_lab.study.claims import ask_trials
from vae_lab.study.outcomes import can_continue, find_child_run, record_outcome
from vae_lab.study.space import suggest_assignment
from vae_lab.study.spec import StudySpec, configuration_label, point_label
from vae_lab.study.workers import Heartbeat, Worker, slurm_task
from vae_lab.tracking.errors import StoreUnavailable, describe
from vae_lab.training.batching import DEFAULT_CAP as DEFAULT_BATCH_CAP
from vae_lab.training.batching import PER_TRIAL_KEYS, plan_batches
from vae_lab.training.checkpoints import Resume, load_checkpoint, read_checkpoint
from vae_lab.training.device import resolve_device
from vae_lab.interrupts import deferring, raise_if_lost
from vae_lab.training.run import run_trials
from vae_lab.training.trial import ClaimLost, TrialSpec


def pruning_callback(trial: optuna.Trial, spec: StudySpec):
    if spec.pruner == "none":
        return None
    metric = spec.objectives[0].metric

    def report(epoch: int, metrics: dict[str, float]) -> None:
        if metric in metrics:
            trial.report(metrics[metric], step=epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch}: {metric}={metrics[metric]:.4g}")
    return report


def prepare_trial(worker: Worker, trial: optuna.Trial, progress: bool) -> TrialSpec:
    """The trial's run config, child-run name and tags, pruning callback, and the run it
    continues (a retry's); records its assignment on the Optuna trial."""
    session, spec = worker.session, worker.spec
    assignment = suggest_assignment(trial, spec)
    config = spec.trial_config(assignment, extra=[f"tracking.uri={session.settings.tracking_uri}"]
                               + ([] if progress else ["train.progress=false"]))
    flat = config.flat()
    swept = {key: flat[key] for key in spec.swept_keys()}
    trial.set_user_attr(store.ASSIGNMENT_ATTR, json.dumps(swept))
    tags = {names.ROLE_TAG: "trial", names.STUDY_NAME_TAG: spec.name,
            names.TRIAL_NUMBER_TAG: str(trial.number), names.CONFIGURATION_TAG: configuration_label(swept)}
    if slurm_task():
        tags[names.SLURM_JOB_TAG] = slurm_task()
    return TrialSpec(config, run_name=point_label(swept) or f"{spec.name} trial {trial.number}", tags=tags,
                     resume=run_to_continue(worker, trial, config), on_epoch_end=pruning_callback(trial, spec))


def run_to_continue(worker: Worker, trial: optuna.Trial, config) -> Resume | None:
    """A retry's stopped run and its newest good checkpoint, or None: the trial starts in a new
    run (the stopped one finished, failed or has no checkpoint; or its checkpoints are corrupt,
    which is said, and that run is ended FAILED). A store that cannot be reached raises."""
    session = worker.session
    run_id, retry_of = trial.user_attrs.get(store.RESUME_ATTR), trial.user_attrs.get(store.RETRY_OF_ATTR)
    if not run_id and retry_of is not None:  # told while the tracking store was down
        run_id = find_child_run(session, int(retry_of))
    if not can_continue(session.client, run_id):
        return None
    found = read_checkpoint(session.client, run_id, config)
    if found.checkpoint is None:
        why = f"its checkpoints are corrupt ({found.why_none()}); trial {trial.number} starts over in a new run"
        tqdm.write(f"trial {trial.number}: run {run_id} cannot continue: {why}")
        session.client.set_tag(run_id, names.FAILURE_REASON_TAG, why)
        session.client.set_terminated(run_id, status="FAILED")
        return None
    for problem in found.problems:
        tqdm.write(f"trial {trial.number}: run {run_id}: {problem}; continuing from the other slot "
                   f"(epoch {found.checkpoint.epoch})")
    trial.set_user_attr(store.RUN_ID_ATTR, run_id)
    return Resume(run_id, found.checkpoint)


@deferring
def tell(worker: Worker, number: int, outcome) -> TrialState | None:
    """Record the trial's outcome, and count it against this worker. When the storage stays
    down the trial is left RUNNING there (a rerun's repair queues it again) and this worker
    stops once its other trials have ended (None)."""
    try:
        state, requeued = record_outcome(worker.session, number, outcome)
    except StoreUnavailable as error:
        worker.store_down = error
        return None
    worker.failures += state == TrialState.FAIL and not requeued
    # a lost claim that could be told again means the storage is back: this worker goes on
    if requeued and not isinstance(outcome, (KeyboardInterrupt, ClaimLost)):
        worker.store_down = outcome
    return state


def run_claimed(worker: Worker, trials: list[optuna.Trial], progress: bool) -> None:
    """Train the claimed trials, same-shaped ones (or sizes that pad) together; tell each as soon as its run ends.
    Trials that cannot share a batch (another shape, or retries continuing from another
    epoch) run in batches of their own. Every claimed trial beats its heartbeat until told."""
    session = worker.session
    pending = {trial.number: trial for trial in trials}
    with contextlib.ExitStack() as stack:
        beats = {trial.number: stack.enter_context(Heartbeat(session.storage, store.trial_id(
            session.storage, session.study, trial.number))) for trial in trials}
        try:
            prepared: dict[int, TrialSpec] = {}
            for trial in trials:
                try:
                    prepared[trial.number] = prepare_trial(worker, trial, progress)
                    prepared[trial.number].claim_lost = beats[trial.number].lost
                except Exception as error:
                    pending.pop(trial.number)
                    tell(worker, trial.number, error)
            align_resumes(worker, list(prepared.values()))
            by_epoch: dict[int, list[int]] = {}
            for number, spec in prepared.items():
                by_epoch.setdefault(spec.resumed_epoch, []).append(number)
            groups = [[members[index] for index in batch] for members in by_epoch.values()
                      for batch in plan_batches([prepared[number].config for number in members],
                                                worker.spec.batch_trials)]
            for members in groups:
                run_group(worker, members, [prepared[number] for number in members], pending)
        except KeyboardInterrupt as interrupt:
            for number in list(pending):  # every claimed trial not yet told: failed and queued again
                tell(worker, pending.pop(number).number, interrupt)
            raise


def run_group(worker: Worker, numbers: list[int], specs: list[TrialSpec], pending: dict) -> None:
    """One pass of `run_trials` for trials `numbers`; each is told as it ends."""
    session = worker.session

    def ended(index: int, outcome) -> None:
        if isinstance(outcome, ClaimLost):  # said now: telling it may have to wait for the storage
            tqdm.write(f"trial {numbers[index]} stopped: {outcome}")
        if pending.pop(numbers[index], None) is not None:
            tell(worker, numbers[index], outcome)

    try:
        data = session.data_cache.get(specs[0].config, resolve_device(specs[0].config.device))
        outcomes = run_trials(specs, data=data, parent_run_id=session.parent_run_id, on_trial_end=ended)
    except KeyboardInterrupt as interrupt:
        # trials that finished (or were pruned) before the interrupt keep that outcome
        for index, outcome in enumerate(getattr(interrupt, "outcomes", [])):
            if outcome is not None:
                ended(index, outcome)
        raise
    except Exception as error:  # refused before any run started (e.g. data smaller than a batch)
        outcomes = [error] * len(specs)
    for index, outcome in enumerate(outcomes):  # the shared pass failed before telling them
        ended(index, outcome)


def align_resumes(worker: Worker, specs: list[TrialSpec]) -> None:
    """Retries of one batch killed while it saved its checkpoints are one epoch apart: the
    ones ahead go back to their previous checkpoint (the engine sends no metrics of an epoch
    before the whole batch has saved it), so the batch trains on together as it did."""
    resumes = [spec.resume for spec in specs if spec.resume is not None]
    if not resumes:
        return
    target = min(resume.epoch for resume in resumes)
    for resume in resumes:
        if resume.epoch == target + 1:
            config = next(spec.config for spec in specs if spec.resume is resume)
            previous = load_checkpoint(worker.session.client, resume.run_id, config, at_most_epoch=target)
            if previous is not None and previous.epoch == target:
                resume.checkpoint = previous


def batch_ask_count(spec: StudySpec) -> int:
    """How many trials to claim at once: the batch cap (auto: 16 on CPU, 64 on CUDA), or 1 when
    the study does not batch (`StudySpec.batches_trials`). A sampler (not a grid) asks for
    several trials only when every swept key is one a batch can vary.
    """
    setting = spec.batch_trials
    if not spec.batches_trials:
        return 1
    if not spec.is_grid and not set(spec.swept_keys()) <= set(PER_TRIAL_KEYS):
        return 1  # sampled trials of different shapes cannot share a batch: ask one at a time
    if isinstance(setting, int):
        return setting
    device = resolve_device(spec.base_config().device)
    return DEFAULT_BATCH_CAP.get(device.type, DEFAULT_BATCH_CAP["cpu"])


def work(worker: Worker, progress: bool, bar=None) -> None:
    """The worker loop: ask, run, tell, until the study has nothing left for this worker.
    A trial ended by an unreachable store (queued again) stops this worker: StoreUnavailable."""
    count = batch_ask_count(worker.spec)
    while True:
        raise_if_lost()  # a Ctrl-C or SIGTERM that a finalizer dropped: claim nothing more
        trials = ask_trials(worker, count=count)
        if not trials:
            return
        run_claimed(worker, trials, progress)
        if bar is not None:
            bar.refresh()
        if isinstance(worker.store_down, StoreUnavailable):
            raise worker.store_down  # says which store, for how long, and what to do
        if worker.store_down is not None:
            # the driver's own first line: a database error's text goes on with its SQL and parameters
            raise StoreUnavailable(f"a trial lost its store ({describe(worker.store_down)}); rerun the same command "
                                   "once the store is back: the trial continues from its checkpoint")
