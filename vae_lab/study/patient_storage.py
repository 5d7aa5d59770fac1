"""An Optuna storage that rides out an outage, as the MLflow store does (`RunTracker.attempt`).

    storage = PatientStorage(optuna.storages.RDBStorage(url), url)

Every storage call that fails because the storage cannot be reached (a PostgreSQL restart, a
network filesystem that stalls, a full disk) is tried again, every few seconds, until it
succeeds or the outage has lasted `store_patience_seconds()`; then StoreUnavailable (the
sweep stops cleanly, resumable, exit 1). Training meanwhile goes on in the worker: only its
bookkeeping waits. After a give-up, calls fail at once (the progress bar and the parent run's
end do not wait again) until one succeeds.

A refusal (a finished trial updated, a bad value) is not an outage: it is raised at once.
`impatient` is the storage without the waiting, for the trial heartbeat, which must notice an
outage rather than sit through it.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import optuna

from vae_lab.tracking.errors import StoreUnavailable, describe, is_store_error, store_patience_seconds
from vae_lab.tracking.uris import redact

RETRY_EVERY_SECONDS = 2.0


def is_outage(error: BaseException) -> bool:
    """An Optuna storage error caused by a storage that cannot be reached (the error itself, or
    what Optuna wrapped in StorageInternalError)."""
    while error is not None:
        if isinstance(error, optuna.exceptions.UpdateFinishedTrialError):
            return False
        if is_store_error(error):
            return True
        error = error.__cause__ or error.__context__
    return False


class PatientStorage(optuna.storages.BaseStorage):
    """`inner` with every call retried through an outage (see the module's doc)."""

    def __init__(self, inner: optuna.storages.BaseStorage, url: str,
                 before_retry: Callable[[], object] | None = None):
        self.inner, self.url = inner, url
        self.before_retry = before_retry  # e.g. repair a journal whose last record a full disk cut
        self._gave_up = False
        self._down_since: float | None = None  # when the current outage began (any call's)

    def _call(self, name: str, *args, **kwargs):
        method = getattr(self.inner, name)
        failing_since = None
        while True:
            try:
                result = method(*args, **kwargs)
            except Exception as error:
                if not is_outage(error):
                    raise
                now = time.monotonic()
                if failing_since is None:
                    failing_since = now
                if self._down_since is None:
                    self._down_since = now
                    logging.getLogger(__name__).warning(
                        "the Optuna storage %s cannot be reached; waiting for it (up to %.0f s): %s",
                        redact(self.url), store_patience_seconds(), describe(error))
                if self._gave_up or now - failing_since >= store_patience_seconds():
                    self._gave_up = True
                    raise StoreUnavailable(
                        f"the Optuna storage {redact(self.url)} has been unreachable for {now - self._down_since:.0f} "
                        "s; rerun the same command once it is back: every trial continues from its checkpoint"
                    ) from error
                time.sleep(RETRY_EVERY_SECONDS)
                if self.before_retry is not None:
                    try:
                        self.before_retry()
                    except Exception:  # still down: the next call says so
                        pass
                continue
            self._gave_up, self._down_since = False, None
            return result


def _delegate(name: str):
    def method(self, *args, **kwargs):
        return self._call(name, *args, **kwargs)
    method.__name__ = name
    return method


for _name in ("create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
              "get_study_id_from_name", "get_study_name_from_id", "get_study_directions",
              "get_study_user_attrs", "get_study_system_attrs", "get_all_studies", "create_new_trial",
              "set_trial_param", "get_trial_id_from_study_id_trial_number", "get_trial_number_from_id",
              "get_trial_param", "set_trial_state_values", "set_trial_intermediate_value",
              "set_trial_user_attr", "set_trial_system_attr", "get_trial", "get_all_trials", "get_n_trials",
              "get_best_trial", "get_trial_params", "get_trial_user_attrs", "get_trial_system_attrs",
              "check_trial_is_updatable", "remove_session"):
    setattr(PatientStorage, _name, _delegate(_name))
PatientStorage.__abstractmethods__ = frozenset()


def impatient(storage: optuna.storages.BaseStorage) -> optuna.storages.BaseStorage:
    """The storage without the waiting: its calls fail at once while it cannot be reached."""
    return storage.inner if isinstance(storage, PatientStorage) else storage
