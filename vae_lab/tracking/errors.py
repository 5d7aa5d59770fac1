"""Which errors mean "the store could not be reached" (wait and retry, resumable) rather than a refusal."""

from __future__ import annotations

import errno
import os
import sys

PATIENCE_ENV = "VAE_LAB_STORE_PATIENCE_SECONDS"
DEFAULT_PATIENCE_SECONDS = 300.0
# a disk that is full, or a network filesystem that is gone, is a store that cannot be reached
OUTAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ESTALE, errno.ENOTCONN, errno.EHOSTDOWN}


def store_patience_seconds() -> float:
    """How long a store may stay unreachable before the run (or study) stops, resumable:
    $VAE_LAB_STORE_PATIENCE_SECONDS, else 300. Training goes on meanwhile."""
    return env_seconds(PATIENCE_ENV, DEFAULT_PATIENCE_SECONDS)


def env_seconds(name: str, default: float) -> float:
    """A duration from the environment variable `name` (`default` when unset); ConfigError
    (exit 2, one line) when it is not a finite number >= 0."""
    from vae_lab.config import ConfigError

    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 <= seconds < float("inf"):
        raise ConfigError(f"${name}={value!r} is not a number of seconds (allowed: a finite number >= 0)")
    return seconds


class StoreUnavailable(RuntimeError):
    """The tracking store stayed unreachable: the run stops, resumable from its checkpoint."""


def is_store_error(error: BaseException) -> bool:
    """Did `error` come from a store that could not be reached (rather than from a refusal)?"""
    import mlflow  # imported when asked: a process that only trains or fails early does without them
    import requests
    import sqlalchemy.exc

    if isinstance(error, (StoreUnavailable, requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                          ConnectionError, TimeoutError, sqlalchemy.exc.OperationalError)):
        return True
    if isinstance(error, OSError) and error.errno in OUTAGE_ERRNOS:
        return True
    if isinstance(error, sqlalchemy.exc.DBAPIError) and error.connection_invalidated:
        return True
    grpc = sys.modules.get("grpc")  # an Optuna storage proxy (grpc://): loaded only where one is used
    if grpc is not None and isinstance(error, grpc.RpcError) and callable(getattr(error, "code", None)):
        # UNAVAILABLE: the proxy is down or restarting, or its database is (`storage.serve_storage`)
        return error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    if not isinstance(error, mlflow.exceptions.MlflowException) or refusal(error) is not None:
        return False
    message = str(error)
    # MLflow's database stores raise TEMPORARILY_UNAVAILABLE for the driver's operational errors
    # (a database server gone, "database or disk is full")
    return (error.error_code == "TEMPORARILY_UNAVAILABLE" or "Max retries exceeded" in message
            or "Connection refused" in message or "timed out" in message)


# what SQLite, PostgreSQL and MySQL say of a row whose unique key another writer inserted first
_DUPLICATE_ROW = ("UNIQUE constraint failed", "duplicate key value violates unique constraint", "Duplicate entry")


def is_duplicate_row(error: BaseException) -> bool:
    """Did the store refuse a row because another process inserted the same key first? MLflow
    looks a shared row up and inserts it if missing, in two steps: two workers that log the
    same new dataset at once both miss it, and the second insert fails. Asked again, the store
    finds the row."""
    import mlflow

    return isinstance(error, mlflow.exceptions.MlflowException) and any(text in str(error) for text in _DUPLICATE_ROW)


def again_if_duplicate_row(call):
    """`call()`, made once more when the store refused a row that another process inserted first
    (`is_duplicate_row`): the second time, MLflow finds that row."""
    try:
        return call()
    except Exception as error:
        if not is_duplicate_row(error):
            raise
        return call()


_REFUSALS = {"UNAUTHENTICATED": "refused the credentials (HTTP 401)",
             "CUSTOMER_UNAUTHORIZED": "refused the credentials (HTTP 401)",
             "PERMISSION_DENIED": "denied the user permission (HTTP 403)"}


def refusal(error: BaseException) -> str | None:
    """What a tracking server refused ("refused the credentials (HTTP 401)", "denied the user
    permission (HTTP 403)") when `error` is such an answer, else None. Not an outage: the same
    request would be refused again, so it is neither waited for nor retried."""
    return _REFUSALS.get(getattr(error, "error_code", None))


def describe(error: BaseException) -> str:
    """The first line of what went wrong at the bottom: the driver's own error, not the
    wrappers' ("An exception is raised during the commit", "raised as a result of autoflush")."""
    while error.__cause__ is not None or getattr(error, "orig", None) is not None:
        error = getattr(error, "orig", None) or error.__cause__
    if callable(getattr(error, "details", None)) and callable(getattr(error, "code", None)):  # a grpc call's
        return f"{error.code().name}: {error.details() or ''}".splitlines()[0][:200]
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__
