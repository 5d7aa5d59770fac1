"""Which errors mean "the store could not be reached" (wait and retry, resumable) rather than a refusal."""

from __future__ import annotations


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
    message = str(error)
    return isinstance(error, mlflow.exceptions.MlflowException) and (
        "Max retries exceeded" in message or "Connection refused" in message or "timed out" in message)
