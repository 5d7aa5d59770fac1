"""Where a study's Optuna bookkeeping lives, and the trial states the sweep relies on.

Claims are made in the Optuna storage itself, so they hold across processes and machines:
a grid point is a WAITING trial, and moving WAITING -> RUNNING is atomic in every Optuna
storage (that is how `Study.ask` pops enqueued trials). A worker that dies leaves its trial
RUNNING; its host/pid and a heartbeat tell the next worker that the trial is stale.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

# Optuna user attributes on trials and studies
POINT_ATTR = "vae_lab.point"  # grid point key (study.point_key)
ASSIGNMENT_ATTR = "vae_lab.assignment"  # JSON of the trial's swept values
WORKER_ATTR = "vae_lab.worker"  # "host:pid" of the process running it
HEARTBEAT_ATTR = "vae_lab.heartbeat"  # unix time, refreshed while it runs
RUN_ID_ATTR = "mlflow_run_id"
REPORTED_ATTR = "vae_lab.test_metrics"  # the finished run's test/* (reported, never used to choose)
REASON_ATTR = "vae_lab.failure_reason"
SKIPPED_ATTR = "vae_lab.skipped"  # a claim that lost to another worker: not a real trial
PARENT_ATTR = "mlflow_parent_run_id"
FINGERPRINT_ATTR = "vae_lab.fingerprint"
CREATOR_ATTR = "vae_lab.creator"
READY_ATTR = "vae_lab.ready"

HEARTBEAT_SECONDS = 20
STALE_AFTER_SECONDS = 120
DONE_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
LIVE_STATES = (TrialState.WAITING, TrialState.RUNNING)
JOURNAL_PREFIX = "journal:///"


def default_storage_url(tracking_uri: str, store_dir: Path, workers: int, study_name: str) -> str:
    """An Optuna store beside the MLflow database (or in `store_dir` for a server URI).

    One worker: SQLite `optuna.db`; several: a journal file `optuna.journal`, which Optuna
    recommends for many processes. A study already kept in the other one is resumed there.
    """
    folder = store_dir
    if tracking_uri.startswith("sqlite:///"):
        folder = Path(tracking_uri[len("sqlite:///"):]).parent
    sqlite_path, journal_path = folder / "optuna.db", folder / "optuna.journal"
    if tracking_uri == f"sqlite:///{sqlite_path}":  # never share one database file with MLflow
        sqlite_path = folder / "optuna-studies.db"
    sqlite_url, journal_url = f"sqlite:///{sqlite_path}", f"{JOURNAL_PREFIX}{journal_path}"
    preferred, other = (journal_url, sqlite_url) if workers > 1 else (sqlite_url, journal_url)
    other_path = journal_path if workers > 1 else sqlite_path
    if other_path.is_file() and study_name in study_names(other):
        return other
    return preferred


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """`journal:///path` (or a path ending .journal) -> a journal file; anything else -> an RDB URL."""
    if url.startswith(JOURNAL_PREFIX) or url.endswith(".journal"):
        path = Path(url[len(JOURNAL_PREFIX):] if url.startswith(JOURNAL_PREFIX) else url)
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(url)


def study_names(url: str) -> list[str]:
    return optuna.get_all_study_names(storage=open_storage(url))


def redact_url(url: str) -> str:
    """Drop a password from a storage URL before it is printed or tagged."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


# ----------------------------------------------------------------------------- trials

def is_skipped(trial: FrozenTrial) -> bool:
    return bool(trial.user_attrs.get(SKIPPED_ATTR))


def real_trials(study: optuna.Study) -> list[FrozenTrial]:
    return [trial for trial in study.get_trials(deepcopy=False) if not is_skipped(trial)]


def trial_id(storage, study: optuna.Study, number: int) -> int:
    study_id = storage.get_study_id_from_name(study.study_name)
    return storage.get_trial_id_from_study_id_trial_number(study_id, number)


def pop_waiting_trial(study: optuna.Study, storage, wanted=None) -> optuna.Trial | None:
    """Claim one WAITING trial (atomic in the storage) for which `wanted(frozen_trial)` holds,
    or None when there is none. The claim records this worker, so a resume can tell whether
    the trial's worker is still alive."""
    for waiting in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if wanted is not None and not wanted(waiting):
            continue
        waiting_id = trial_id(storage, study, waiting.number)
        try:
            if storage.set_trial_state_values(waiting_id, state=TrialState.RUNNING):
                mark_claimed(storage, waiting_id)
                return optuna.Trial(study, waiting_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def mark_claimed(storage, claimed_id: int) -> None:
    storage.set_trial_user_attr(claimed_id, WORKER_ATTR, worker_name())
    storage.set_trial_user_attr(claimed_id, HEARTBEAT_ATTR, time.time())


def earlier_claim(study: optuna.Study, number: int, point: str) -> int | None:
    """The number of an earlier trial that holds `point` (waiting, running or done), if any.

    Called after our own claim is RUNNING: trial numbers grow with creation time, so of two
    trials for one point the later one always sees the earlier and steps aside.
    """
    for trial in study.get_trials(deepcopy=False):
        if trial.number < number and trial.user_attrs.get(POINT_ATTR) == point \
                and trial.state in DONE_STATES + LIVE_STATES and not is_skipped(trial):
            return trial.number
    return None


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped) is gone too
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def stale_reason(trial: FrozenTrial, my_trials: set[int], now: float | None = None) -> str | None:
    """Why a RUNNING trial has no live worker any more, or None if it may still be running."""
    if trial.number in my_trials:
        return None
    now = time.time() if now is None else now
    worker = trial.user_attrs.get(WORKER_ATTR)
    started = trial.datetime_start.timestamp() if trial.datetime_start else now
    if worker:
        host, _, pid = worker.rpartition(":")
        if host == socket.gethostname() and pid.isdigit():
            if int(pid) == os.getpid():
                return f"worker {worker} restarted"
            if not pid_alive(int(pid)):
                return f"worker {worker} is gone"
    last_sign = float(trial.user_attrs.get(HEARTBEAT_ATTR, started))
    if now - last_sign > STALE_AFTER_SECONDS:
        return f"no heartbeat from {worker or 'its worker'} for {now - last_sign:.0f} s"
    return None


def fail_stale_trials(study: optuna.Study, storage, my_trials: set[int]) -> list[FrozenTrial]:
    """Mark RUNNING trials whose worker is gone as FAIL; returns them."""
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = stale_reason(trial, my_trials)
        if reason is None:
            continue
        stale_id = trial_id(storage, study, trial.number)
        try:
            storage.set_trial_user_attr(stale_id, REASON_ATTR, f"interrupted: {reason}")
            storage.set_trial_state_values(stale_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        failed.append(trial)
    return failed


class Heartbeat:
    """Refreshes a running trial's heartbeat attribute from a background thread."""

    def __init__(self, storage, trial_id_: int):
        self.storage, self.trial_id = storage, trial_id_
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="vae_lab-heartbeat")

    def __enter__(self) -> "Heartbeat":
        self.storage.set_trial_user_attr(self.trial_id, WORKER_ATTR, worker_name())
        self.storage.set_trial_user_attr(self.trial_id, HEARTBEAT_ATTR, time.time())
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self.storage.set_trial_user_attr(self.trial_id, HEARTBEAT_ATTR, time.time())
            except Exception:  # the trial finished meanwhile, or the store blinked
                pass


def assignment_of(trial: FrozenTrial) -> dict:
    return json.loads(trial.user_attrs.get(ASSIGNMENT_ATTR, "{}"))
