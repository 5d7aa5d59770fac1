"""Running a study's trials: the worker loop, one trial or a batch of them in the engine, and
`record_outcome`, the one place that decides a trial's fate in Optuna.

    work(session, progress)     # ask, run, tell, until the study has nothing left for us

A trial's fate: COMPLETE with its objective values (read from its run's metrics), PRUNED, or
FAIL. A trial stopped from outside (Ctrl-C, SIGTERM, an unreachable store) is FAIL and is
queued again at once (`study_claims.requeue`): its retry continues the same MLflow run from
its checkpoint. Telling a trial that is already finished changes nothing.
"""

from __future__ import annotations

import contextlib
import json

import optuna
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.trial import TrialState
from tqdm.auto import tqdm

from . import names
from . import study_storage as store
from .batched import DEFAULT_CAP as DEFAULT_BATCH_CAP
from .batched import PER_TRIAL_KEYS, plan_batches, train_batch
from .checkpoints import CHECKPOINT_DIR, Resume, load_checkpoint
from .config import Config
from .engine import RunResult, resolve_device
from .study import StudySpec
from .study_claims import ask_trials, requeue
from .study_optuna import suggest_assignment
from .study_session import Session
from .study_workers import Heartbeat
from .tracking import StoreUnavailable, is_store_error
from .train import train


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


def find_child_run(session: Session, number: int) -> str | None:
    experiment_id = session.client.get_run(session.parent_run_id).info.experiment_id
    runs = session.client.search_runs(
        [experiment_id], max_results=1,
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{session.parent_run_id}' "
                      f"and tags.`{names.TRIAL_NUMBER_TAG}` = '{number}'",
        order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def can_continue(client: MlflowClient, run_id: str | None) -> bool:
    """Was run `run_id` stopped from outside (RUNNING or KILLED) with a checkpoint to go on from?"""
    if not run_id:
        return False
    try:
        if client.get_run(run_id).info.status not in ("RUNNING", "KILLED"):
            return False
        return bool(client.list_artifacts(run_id, CHECKPOINT_DIR))
    except Exception:
        return False


def stopped_from_outside(outcome) -> bool:
    return isinstance(outcome, KeyboardInterrupt) or (isinstance(outcome, Exception) and is_store_error(outcome))


def record_outcome(session: Session, number: int, outcome: RunResult | BaseException) -> TrialState:
    """Tell Optuna how trial `number` ended: COMPLETE with its objective values, PRUNED, or FAIL
    (and queued again when it was stopped from outside)."""
    spec, storage = session.spec, session.storage
    trial_id = store.trial_id(storage, session.study, number)
    current = storage.get_trial(trial_id)
    if current.state.is_finished():
        return current.state  # told already (by this worker, or by one that repaired it)
    state, values, reason, run_id = TrialState.FAIL, None, "", None
    if isinstance(outcome, RunResult):
        run_id = outcome.run_id
        missing = [o.metric for o in spec.objectives if o.metric not in outcome.metrics]
        if missing:
            reason = f"the run logged no {missing[0]}"
        else:
            values, state = [float(outcome.metrics[o.metric]) for o in spec.objectives], TrialState.COMPLETE
            storage.set_trial_user_attr(trial_id, store.REPORTED_ATTR, {
                key: value for key, value in outcome.metrics.items() if key.startswith(f"{names.TEST}/")})
    elif isinstance(outcome, optuna.TrialPruned):
        state, reason = TrialState.PRUNED, str(outcome)
    elif isinstance(outcome, KeyboardInterrupt):
        reason = f"interrupted ({type(outcome).__name__})"
    else:
        reason = f"{type(outcome).__name__}: {outcome}"
    run_id = run_id or current.user_attrs.get(store.RUN_ID_ATTR) or find_child_run(session, number)
    if run_id:
        storage.set_trial_user_attr(trial_id, store.RUN_ID_ATTR, run_id)
    if state != TrialState.COMPLETE:
        storage.set_trial_user_attr(trial_id, store.REASON_ATTR, reason[:2000])
    retry = state == TrialState.FAIL and stopped_from_outside(outcome)
    session.failures += state == TrialState.FAIL and not retry
    session.study.tell(number, values=values, state=state, skip_if_finished=True)
    if retry:
        requeue(session.study, current, run_id if can_continue(session.client, run_id) else None)
        if not isinstance(outcome, KeyboardInterrupt):
            session.store_down = outcome
    if state == TrialState.FAIL and not isinstance(outcome, KeyboardInterrupt):
        tqdm.write(f"trial {number} failed: {reason.splitlines()[0] if reason else ''}"
                   + ("; queued again, to continue from its checkpoint" if retry else ""))
    return state


def trial_name(session: Session, trial: optuna.Trial) -> str:
    return f"{session.spec.name} trial {trial.number}"


def prepare_trial(session: Session, trial: optuna.Trial, progress: bool) -> tuple[Config, dict, Resume | None]:
    """The trial's run config, child-run tags and the run it continues (a retry's); records its
    assignment on the Optuna trial."""
    spec = session.spec
    assignment = suggest_assignment(trial, spec)
    config = spec.trial_config(assignment, extra=[f"tracking.uri={session.settings.tracking_uri}"]
                               + ([] if progress else ["train.progress=false"]))
    swept = config.flat()
    trial.set_user_attr(store.ASSIGNMENT_ATTR, json.dumps({key: swept[key] for key in spec.swept_keys()}))
    tags = {names.ROLE_TAG: "trial", names.STUDY_NAME_TAG: spec.name,
            names.TRIAL_NUMBER_TAG: str(trial.number)}
    resume = None
    run_id = trial.user_attrs.get(store.RESUME_ATTR)
    if run_id and can_continue(session.client, run_id):
        checkpoint = load_checkpoint(session.client, run_id)
        if checkpoint is not None:
            resume = Resume(run_id, checkpoint)
            trial.set_user_attr(store.RUN_ID_ATTR, run_id)
    return config, tags, resume


def run_trial(session: Session, trial: optuna.Trial, progress: bool) -> TrialState:
    """Build the trial's config, train it as a child run (or continue its run), tell Optuna."""
    trial_id = store.trial_id(session.storage, session.study, trial.number)
    with Heartbeat(session.storage, trial_id):
        try:
            config, tags, resume = prepare_trial(session, trial, progress)
            outcome = train(config, parent_run_id=session.parent_run_id, run_name=trial_name(session, trial),
                            tags=tags, data=session.data_cache.get(config),
                            on_epoch_end=pruning_callback(trial, session.spec), resume=resume)
        except KeyboardInterrupt as interrupt:
            record_outcome(session, trial.number, interrupt)
            raise
        except Exception as error:  # a failed trial is recorded; the study goes on
            outcome = error
        return record_outcome(session, trial.number, outcome)


def run_trials_batched(session: Session, trials: list[optuna.Trial], progress: bool) -> None:
    """Train same-shaped trials together (vae_lab.batched); each keeps its own child run and
    Optuna trial, told as soon as its run ends. Trials that cannot share a batch (another
    shape, or retries continuing from another epoch) run in batches of their own."""
    prepared, failed_early = {}, {}
    for trial in trials:
        try:
            prepared[trial.number] = prepare_trial(session, trial, progress)
        except Exception as error:
            failed_early[trial.number] = error
    ready = [trial for trial in trials if trial.number in prepared]
    align_resumes(session, [prepared[trial.number] for trial in ready])
    by_epoch: dict[int, list[optuna.Trial]] = {}
    for trial in ready:
        resume = prepared[trial.number][2]
        by_epoch.setdefault(resume.epoch if resume else 0, []).append(trial)
    groups = [[members[index] for index in batch] for members in by_epoch.values()
              for batch in plan_batches([prepared[trial.number][0] for trial in members], session.spec.batch_trials)]
    pending = {trial.number: trial for trial in trials}
    try:
        for number, error in failed_early.items():
            pending.pop(number)
            record_outcome(session, number, error)
        for members in groups:
            if len(members) == 1:
                run_trial(session, pending.pop(members[0].number), progress)
                continue
            configs = [prepared[trial.number][0] for trial in members]

            def ended(index: int, outcome, members=members) -> None:
                record_outcome(session, members[index].number, outcome)
                pending.pop(members[index].number, None)

            with contextlib.ExitStack() as beats:
                for trial in members:
                    beats.enter_context(Heartbeat(
                        session.storage, store.trial_id(session.storage, session.study, trial.number)))
                try:
                    results = train_batch(
                        configs, data=session.data_cache.get(configs[0]), parent_run_id=session.parent_run_id,
                        run_names=[trial_name(session, trial) for trial in members],
                        tags=[prepared[trial.number][1] for trial in members],
                        on_epoch_end=[pruning_callback(trial, session.spec) for trial in members],
                        resume=[prepared[trial.number][2] for trial in members], on_trial_end=ended)
                except KeyboardInterrupt as interrupt:
                    # trials that finished (or were pruned) before the interrupt keep that outcome
                    for trial, outcome in zip(members, getattr(interrupt, "outcomes", [])):
                        if outcome is not None and trial.number in pending:
                            record_outcome(session, pending.pop(trial.number).number, outcome)
                    raise
            for trial, outcome in zip(members, results):
                if trial.number in pending:  # the shared pass failed before telling it
                    record_outcome(session, pending.pop(trial.number).number, outcome)
    except KeyboardInterrupt as interrupt:
        for trial in pending.values():  # every claimed trial not yet told: failed and queued again
            record_outcome(session, trial.number, interrupt)
        raise


def align_resumes(session: Session, prepared: list[tuple]) -> None:
    """Retries of one batch killed while it saved its checkpoints are one epoch apart: the
    ones ahead go back to their previous checkpoint (the engine sends no metrics of an epoch
    before the whole batch has saved it), so the batch trains on together as it did."""
    resumes = [resume for _, _, resume in prepared if resume is not None]
    if not resumes:
        return
    target = min(resume.epoch for resume in resumes)
    for resume in resumes:
        if resume.epoch == target + 1:
            previous = load_checkpoint(session.client, resume.run_id, at_most_epoch=target)
            if previous is not None and previous.epoch == target:
                resume.checkpoint = previous


def batch_ask_count(session: Session) -> int:
    """How many trials to claim at once: the batch cap (auto: 16 on CPU, 64 on CUDA).

    `auto` leaves pruned studies unbatched: a pruner compares a trial with trials that
    finished before it, and trials trained side by side never have any. A sampler (not a
    grid) asks for several trials only when every swept key is one a batch can vary.
    """
    setting, spec = session.spec.batch_trials, session.spec
    if setting == "off" or (setting == "auto" and spec.pruner != "none"):
        return 1
    if not spec.is_grid and not set(spec.swept_keys()) <= set(PER_TRIAL_KEYS):
        return 1  # sampled trials of different shapes cannot share a batch: ask one at a time
    if isinstance(setting, int):
        return setting
    device = resolve_device(session.spec.base_config().device)
    return DEFAULT_BATCH_CAP.get(device.type, DEFAULT_BATCH_CAP["cpu"])


def work(session: Session, progress: bool, bar=None) -> None:
    """The worker loop: ask, run, tell, until the study has nothing left for this worker.
    A trial ended by an unreachable store (queued again) stops this worker: StoreUnavailable."""
    count = batch_ask_count(session)
    while trials := ask_trials(session, count=count):
        if len(trials) == 1:
            run_trial(session, trials[0], progress)
        else:
            run_trials_batched(session, trials, progress)
        if bar is not None:
            bar.refresh()
        if session.store_down is not None:
            raise StoreUnavailable(f"a trial lost its store ({session.store_down}); it is queued to continue "
                                   "from its checkpoint: rerun the same command once the store is back")
