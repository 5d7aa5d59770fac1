"""How a trial ended, told to Optuna: `record_outcome`, the one place that decides a trial's fate.

A trial's fate: COMPLETE with its objective values (read from its run's metrics), PRUNED, or
FAIL. A trial stopped from outside (Ctrl-C, SIGTERM, an unreachable store) is FAIL and is
queued again at once (`claims.requeue`): its retry continues the same MLflow run from its
checkpoint. Telling a trial that is already finished changes nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import optuna
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.trial import TrialState
from tqdm.auto import tqdm

from vae_lab import names
from vae_lab.names import CHECKPOINT_DIR
from vae_lab.study import storage as store
from vae_lab.study.claims import requeue
from vae_lab.study.session import Session
from vae_lab.tracking.errors import is_store_error
from vae_lab.training.trial import RunResult


def find_child_run(session: Session, number: int) -> str | None:
    experiment_id = session.client.get_run(session.parent_run_id).info.experiment_id
    runs = session.client.search_runs(
        [experiment_id], max_results=1,
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{session.parent_run_id}' "
                      f"and tags.`{names.TRIAL_NUMBER_TAG}` = '{number}'",
        order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def can_continue(client: MlflowClient, run_id: str | None) -> bool:
    """Was run `run_id` stopped from outside (RUNNING or KILLED) with a checkpoint to go on from?
    Asked when its retry starts; a store that cannot be reached raises (the retry waits for it)."""
    if not run_id:
        return False
    if client.get_run(run_id).info.status not in ("RUNNING", "KILLED"):
        return False
    return bool(client.list_artifacts(run_id, CHECKPOINT_DIR))


def child_run_if_reachable(session: Session, number: int) -> str | None:
    """`find_child_run`, or None while the tracking store cannot be reached (the retry finds the
    run by its trial number then: `trials.run_to_continue`)."""
    try:
        return find_child_run(session, number)
    except Exception as error:
        if is_store_error(error):
            return None
        raise


def stopped_from_outside(outcome) -> bool:
    return isinstance(outcome, KeyboardInterrupt) or (isinstance(outcome, Exception) and is_store_error(outcome))


class Told(NamedTuple):
    state: TrialState
    requeued: bool  # FAIL, stopped from outside: a retry is queued


def record_outcome(session: Session, number: int, outcome: RunResult | BaseException) -> Told:
    """Tell Optuna how trial `number` ended: COMPLETE with its objective values, PRUNED, or FAIL
    (and queued again when it was stopped from outside)."""
    spec, storage = session.spec, session.storage
    trial_id = store.trial_id(storage, session.study, number)
    current = storage.get_trial(trial_id)
    if current.state.is_finished():
        return Told(current.state, False)  # told already (by this worker, or by one that repaired it)
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
    run_id = run_id or current.user_attrs.get(store.RUN_ID_ATTR) or child_run_if_reachable(session, number)
    if run_id:
        storage.set_trial_user_attr(trial_id, store.RUN_ID_ATTR, run_id)
    if state != TrialState.COMPLETE:
        storage.set_trial_user_attr(trial_id, store.REASON_ATTR, reason[:2000])
    retry = state == TrialState.FAIL and stopped_from_outside(outcome)
    session.study.tell(number, values=values, state=state, skip_if_finished=True)
    if retry:  # whether its run can continue is asked when the retry starts (the store may be down now)
        requeue(session.study, current, run_id)
    if state == TrialState.FAIL and not isinstance(outcome, KeyboardInterrupt):
        tqdm.write(f"trial {number} failed: {reason.splitlines()[0] if reason else ''}"
                   + ("; queued again, to continue its run from its checkpoint" if retry else ""))
    return Told(state, retry)
