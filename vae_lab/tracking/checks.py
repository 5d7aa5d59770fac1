"""Can the stores a command needs be reached? Asked before anything is created anywhere.

    check_tracking_store("http://127.0.0.1:5000")        # StoreUnreachable (a ConfigError: exit 2)
    vae_lab.study.storage.check_optuna_storage("postgresql://u@db/optuna")   # the same checks, for Optuna

Each check gives up within CHECK_SECONDS with one line naming the URI (password hidden) and
what failed; MLflow's own client would retry an unreachable server for minutes.
"""

from __future__ import annotations

import base64
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from vae_lab.config import ConfigError
from vae_lab.tracking.uris import redact, sqlite_path

CHECK_SECONDS = 10

# During a study a store call that fails is retried by vae_lab (metrics wait in the run's buffer,
# `tracking.RunTracker.attempt`), so MLflow's own retries are kept short: about 15 s, not 4 min.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


class StoreUnreachable(ConfigError):
    """A tracking server or a database that does not answer."""


def short_http_retries() -> None:
    for key, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def _reason(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    reason = getattr(error, "reason", None) or error
    return str(reason).splitlines()[0][:200] or type(error).__name__


def _writable_folder(path: Path) -> Path:
    """The nearest existing folder above `path` (what creating it would need to write to)."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_local_file(path: Path, what: str, uri: str) -> None:
    target = path if path.exists() else _writable_folder(path)
    if not os.access(target, os.W_OK):
        raise StoreUnreachable(f"cannot write the {what} {redact(uri)}: {target} is not writable")


def check_database(url: str, what: str) -> None:
    import sqlalchemy

    connect_args = {"connect_timeout": CHECK_SECONDS} if url.startswith(("postgresql", "mysql")) else {}
    try:
        engine = sqlalchemy.create_engine(url, connect_args=connect_args)
        with engine.connect():
            pass
        engine.dispose()
    except ModuleNotFoundError as error:
        raise StoreUnreachable(f"cannot open the {what} {redact(url)}: {error} "
                               "(for postgresql://, pip install -e \".[postgres]\")") from None
    except Exception as error:
        raise StoreUnreachable(f"cannot reach the {what} {redact(url)}: "
                               f"{str(getattr(error, 'orig', None) or error).splitlines()[0][:200]}") from None


def health_request(uri: str) -> urllib.request.Request:
    """GET <server>/health; credentials in the URI (http://user:password@host) go in an
    Authorization header, as MLflow's client sends them, not in the host name."""
    parts = urllib.parse.urlsplit(uri)
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
    url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
    request = urllib.request.Request(url)
    if parts.username is not None:
        token = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(token.encode()).decode())
    return request


def check_tracking_store(uri: str) -> None:
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(health_request(uri), timeout=CHECK_SECONDS):
                return
        except Exception as error:
            raise StoreUnreachable(f"cannot reach the MLflow tracking server {redact(uri)}: {_reason(error)}; "
                                   "start it (mlflow server ...) or pass another --tracking-uri") from None
    if sqlite_path(uri) is not None:
        check_local_file(sqlite_path(uri), "MLflow store", uri)
    elif uri.startswith(("postgresql", "mysql", "mssql")):
        check_database(uri, "MLflow store")
