"""What happens to trials and runs that a stopped worker left behind.

    lines = repair_stale_trials(session)   # stale RUNNING trials: COMPLETE, or FAIL and queued again
    kill_orphan_runs(session)              # RUNNING child runs nobody trains: KILLED

A stale trial (`workers.stale_reason`) whose MLflow run FINISHED is recorded COMPLETE
from the run's logged metrics: its worker was killed after the run ended but before Optuna
heard of it, and nothing is trained again. Any other stale trial is failed (one worker wins
that change in the storage) and queued again by that worker; the retry continues the run
from its checkpoint when it has one.
"""

from __future__ import annotations

import optuna
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.trial import TrialState

from vae_lab import names
from vae_lab.study import storage as store
from vae_lab.tracking.tracker import delete_checkpoints
from vae_lab.training.trial import RunResult
from vae_lab.study.claims import requeue
from vae_lab.study.session import Session
from vae_lab.study.outcomes import find_child_run, record_outcome
from vae_lab.study.workers import stale_reason


def repair_stale_trials(session: Session, my_trials: set[int] = frozenset()) -> list[str]:
    """Settle every RUNNING trial whose worker is gone (never this worker's `my_trials`);
    returns one line per trial, for the user."""
    lines = []
    for trial in session.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = stale_reason(trial, my_trials)
        if reason is None:
            continue
        run_id = trial.user_attrs.get(store.RUN_ID_ATTR) or find_child_run(session, trial.number)
        run = session.client.get_run(run_id) if run_id else None
        if run is not None and run.info.status == "FINISHED":
            record_outcome(session, trial.number, RunResult(metrics=dict(run.data.metrics), run_id=run_id,
                                                            model=None))
            delete_checkpoints(session.client, run_id)
            lines.append(f"trial {trial.number}: its run finished before its worker stopped ({reason}); "
                         "recorded from the run")
            continue
        stale_id = store.trial_id(session.storage, session.study, trial.number)
        try:
            session.storage.set_trial_user_attr(stale_id, store.REASON_ATTR, f"interrupted: {reason}")
            if run_id:
                session.storage.set_trial_user_attr(stale_id, store.RUN_ID_ATTR, run_id)
            session.storage.set_trial_state_values(stale_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first, and queues the retry
        requeue(session.study, trial, run_id)
        lines.append(f"trial {trial.number} was left running ({reason}): queued again"
                     + (", to continue its run from its checkpoint" if run_id else ""))
    return lines


def kill_orphan_runs(session: Session) -> int:
    """End KILLED every child run left RUNNING whose trial is no longer running live
    (a retry that continues it makes it RUNNING again)."""
    parent = session.client.get_run(session.parent_run_id)
    before = session.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    orphans = session.client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{session.parent_run_id}' and attributes.status = 'RUNNING'")
    # and after: a trial another worker claimed meanwhile may have started its run before the search
    running = before + session.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    running_trials = {trial.number for trial in running}
    running_runs = {trial.user_attrs.get(store.RUN_ID_ATTR) for trial in running}
    killed = 0
    for run in orphans:
        number = run.data.tags.get(names.TRIAL_NUMBER_TAG, "")
        if (number.isdigit() and int(number) in running_trials) or run.info.run_id in running_runs:
            continue
        session.client.set_tag(run.info.run_id, names.FAILURE_REASON_TAG, "its sweep worker stopped (killed or lost)")
        session.client.set_terminated(run.info.run_id, status="KILLED")
        killed += 1
    return killed
