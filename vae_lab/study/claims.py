"""Which trials a worker runs: grid points queued and claimed, sampled trials asked, retries.

Claims are made in the Optuna storage itself, so they hold across processes and machines:
a grid point is a WAITING trial, and moving WAITING -> RUNNING is atomic in every Optuna
storage (that is how `Study.ask` pops enqueued trials). A trial whose worker stopped is
retried as a new WAITING trial with the same values (`requeue`), which continues the
stopped trial's MLflow run when that run has a checkpoint.
"""

from __future__ import annotations

import json
import time

import optuna
from optuna.trial import FrozenTrial, TrialState

from vae_lab.interrupts import deferring
from vae_lab.study import storage as store
from vae_lab.training.batching import batch_key, relative_cost, stacking_pays
from vae_lab.study.spec import StudySpec, point_key
from vae_lab.study.space import encode
from vae_lab.study.session import Session
from vae_lab.study.workers import Worker, mark_claimed

ENQUEUE_AHEAD = 256  # grid points queued at a time


def earlier_claim(study: optuna.Study, number: int, point: str) -> int | None:
    """The number of an earlier trial that holds `point` (waiting, running or done), if any.

    Called after our own claim is RUNNING: trial numbers grow with creation time, so of two
    trials for one point the later one always sees the earlier and steps aside.
    """
    for trial in study.get_trials(deepcopy=False):
        if trial.number < number and trial.user_attrs.get(store.POINT_ATTR) == point \
                and trial.state in store.DONE_STATES + store.LIVE_STATES and not store.is_skipped(trial):
            return trial.number
    return None


def enqueue_missing_points(study: optuna.Study, spec: StudySpec, retry_failed: bool,
                           at_most: int = ENQUEUE_AHEAD) -> int:
    """Enqueue up to `at_most` grid points, in grid order, that have no waiting, running or
    finished trial (nor a failed one, unless `retry_failed`: a new session retries those).
    The grid is queued a slice at a time (`ask_trials` tops it up), so a large one starts at once."""
    states = store.DONE_STATES + store.LIVE_STATES + (() if retry_failed else (TrialState.FAIL,))
    covered = {trial.user_attrs.get(store.POINT_ATTR) for trial in store.real_trials(study) if trial.state in states}
    added = 0
    for assignment in spec.iter_grid_points():
        if added >= at_most:
            break
        key = point_key(assignment)
        if key not in covered:
            study.enqueue_trial(params={name: encode(value) for name, value in assignment.items()},
                                user_attrs={store.POINT_ATTR: key,
                                            store.ASSIGNMENT_ATTR: json.dumps(assignment)})
            added += 1
    return added


def requeue(study: optuna.Study, trial: FrozenTrial, resume_run_id: str | None) -> None:
    """Queue a retry of a trial that stopped (same values); it continues `resume_run_id`."""
    attrs = {key: trial.user_attrs[key] for key in (store.POINT_ATTR, store.ASSIGNMENT_ATTR) if key in trial.user_attrs}
    attrs[store.RETRY_OF_ATTR] = trial.number
    if resume_run_id:
        attrs[store.RESUME_ATTR] = resume_run_id
    params = trial.params
    if store.ASSIGNMENT_ATTR in attrs and store.POINT_ATTR in attrs:  # a grid point: its own values
        params = {name: encode(value) for name, value in json.loads(attrs[store.ASSIGNMENT_ATTR]).items()}
    study.enqueue_trial(params=params, user_attrs=attrs)


def budget_used(session: Session, before: int | None = None) -> int:
    """Trials counted against study.n_trials (complete, pruned, running, waiting)."""
    return sum(1 for trial in store.real_trials(session.study)
               if trial.state in store.DONE_STATES + store.LIVE_STATES
               and (before is None or trial.number < before))


def skip(session: Session, trial: optuna.Trial, why: str) -> None:
    trial.set_user_attr(store.SKIPPED_ATTR, why)
    session.study.tell(trial, state=TrialState.FAIL)


@deferring
def ask_trials(worker: Worker, count: int = 1) -> list[optuna.Trial]:
    """Claim up to `count` trials to run now; [] when the study has nothing left for us.

    With count > 1 (batched trials), a grid claims only points that can train in one batch
    with the first one it claims, so other workers keep the rest. When this machine runs
    several workers, a grid's first claim takes the costliest batch still waiting (longest
    first: the workers then finish together, rather than one training the largest batch alone
    at the end).
    """
    claimed: list[optuna.Trial] = []
    session, spec = worker.session, worker.spec

    def claim(trial_id: int) -> None:  # recorded, so a resume can tell whether our process is alive
        mark_claimed(session.storage, trial_id)
    first_key = None
    while len(claimed) < count:
        if worker.deadline is not None and time.time() > worker.deadline:
            break
        if spec.is_grid:
            target = first_key
            if target is None and session.settings.workers_here > 1:
                target = costliest_waiting_batch(worker)
            wanted = None if target is None else (
                lambda waiting: batch_key_of_point(worker, waiting.user_attrs.get(store.ASSIGNMENT_ATTR)) == target)
            trial = store.pop_waiting_trial(session.study, session.storage, wanted, on_claim=claim)
            if trial is None and target is not None and first_key is None:
                continue  # another worker took that batch first: choose again
            if trial is None and not claimed and enqueue_missing_points(session.study, spec, retry_failed=False):
                continue  # the queue ran dry: the next slice of the grid
            if trial is None:
                break
            earlier = earlier_claim(session.study, trial.number, trial.user_attrs[store.POINT_ATTR])
            if earlier is not None:
                skip(session, trial, f"grid point already held by trial {earlier}")
                continue
            if first_key is None and count > 1:
                first_key = batch_key_of_point(worker, trial.user_attrs.get(store.ASSIGNMENT_ATTR))
                if spec.batch_trials == "auto" and not trains_stacked(worker, trial):
                    count = 1  # trained one by one anyway: the other workers may take the rest
        else:
            trial = store.pop_waiting_trial(session.study, session.storage, on_claim=claim)  # retries of stopped trials first
            if trial is None:
                if budget_used(session) >= spec.n_trials or worker.failures >= spec.n_trials:
                    break
                trial = session.study.ask()
                mark_claimed(session.storage, store.trial_id(session.storage, session.study, trial.number))
                if budget_used(session, before=trial.number) >= spec.n_trials:
                    skip(session, trial, "study.n_trials reached by other workers")
                    break
        worker.my_trials.add(trial.number)
        claimed.append(trial)
    return claimed


def costliest_waiting_batch(worker: Worker):
    """The batch key of the waiting grid points that cost the most to train (None: none waits)."""
    keys = set()
    for waiting in worker.session.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        assignment = waiting.user_attrs.get(store.ASSIGNMENT_ATTR)
        key = batch_key_of_point(worker, assignment)
        if key is not None and key not in worker.batch_costs:
            try:
                worker.batch_costs[key] = relative_cost(worker.spec.trial_config(json.loads(assignment or "{}")))
            except Exception:  # a point that cannot be built fails when it runs
                worker.batch_costs[key] = 0.0
        keys.add(key)
    keys.discard(None)
    return max(keys, key=worker.batch_costs.__getitem__, default=None)


def trains_stacked(worker: Worker, trial: optuna.Trial) -> bool:
    """Whether a grid point's batch would train stacked (`batching.stacking_pays`)."""
    try:
        return stacking_pays(worker.spec.trial_config(store.assignment_of(trial)))
    except Exception:  # an invalid point fails when it runs, alone
        return False


def batch_key_of_point(worker: Worker, assignment_json: str | None):
    """The batch key of a grid point's config (vae_lab.training.batching.batch_key), cached per point."""
    if assignment_json not in worker.point_batch_keys:
        try:
            config = worker.spec.trial_config(json.loads(assignment_json or "{}"))
            worker.point_batch_keys[assignment_json] = batch_key(config)
        except Exception:  # an invalid point fails when it runs, alone
            worker.point_batch_keys[assignment_json] = None
    return worker.point_batch_keys[assignment_json]
