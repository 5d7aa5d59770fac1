"""Can the stores a command needs be reached? Asked before anything is created anywhere.

    check_tracking_store("http://127.0.0.1:5000")        # StoreUnreachable (a ConfigError: exit 2)
    vae_lab.study.storage.check_optuna_storage("postgresql://u@db/optuna")   # the same checks, for Optuna

Each check gives up within CHECK_SECONDS with one line naming the URI (password hidden) and
what failed; MLflow's own client would retry an unreachable server for minutes. A tracking
server that asks for a login (`mlflow server --app-name basic-auth`) and refuses the credentials
MLflow's client would send, or has none, is refused here too.
"""

from __future__ import annotations

import base64
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from vae_lab.cli import shell_command
from vae_lab.config import ConfigError
from vae_lab.tracking.uris import redact, sqlite_path

CHECK_SECONDS = 10
EXPERIMENTS_SEARCH = "/api/2.0/mlflow/experiments/search"  # the cheapest read of MLflow's REST API

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


def _sent_username(response) -> str | None:
    """The user named by the Basic Authorization header `response`'s request carried, if any."""
    header = response.request.headers.get("Authorization", "")
    if not header.startswith("Basic "):
        return None
    try:
        return base64.b64decode(header[len("Basic "):]).decode().split(":", 1)[0]
    except ValueError:
        return None


def check_credentials(uri: str, timeout: float) -> None:
    """A read that needs a login on a server that asks for one (`mlflow server --app-name basic-auth`
    leaves /health open), sent with the credentials MLflow's client would send."""
    from vae_lab.tracking import mlflow_compat

    try:
        response = mlflow_compat.tracking_server_get(uri, EXPERIMENTS_SEARCH, timeout, max_results=1)
    except Exception as error:
        raise StoreUnreachable(f"cannot reach the MLflow tracking server {redact(uri)}: "
                               f"{redact(str(error).splitlines()[0][:200])}") from None
    if response.status_code not in (401, 403):
        return
    server = f"the MLflow tracking server {redact(uri)}"
    source = ("the user:password in the tracking URI" if urllib.parse.urlsplit(uri).username is not None
              else "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")
    sent = "Authorization" in response.request.headers
    user = _sent_username(response)
    who = f"user {user!r}" if user is not None else "the credentials given"
    if response.status_code == 403:
        raise StoreUnreachable(f"{server} denies {who} permission to read experiments (HTTP 403); ask its "
                               f"admin for access, or log in as another user ({source})")
    if not sent:
        raise StoreUnreachable(f"{server} needs a login and none was given (HTTP 401); set "
                               "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or use "
                               "http://USER:PASSWORD@host)")
    raise StoreUnreachable(f"{server} refused the credentials of {who} (HTTP 401); check {source}")


def refused_by_server(error: BaseException, uri: str) -> StoreUnreachable | None:
    """The one-line StoreUnreachable (exit 2) to raise when `error` is the tracking server refusing
    the credentials (401) or the permission (403) after the start check passed (a password changed
    mid-study, a user who may read but not write); None for any other error."""
    from vae_lab.tracking.errors import refusal

    refused = refusal(error)
    if refused is None:
        return None
    return StoreUnreachable(f"the MLflow tracking server {redact(uri)} {refused}; rerun as a user it accepts "
                            "and that may write to the experiment (MLFLOW_TRACKING_USERNAME / "
                            "MLFLOW_TRACKING_PASSWORD): a study continues where it stopped")


def check_tracking_store(uri: str) -> None:
    if uri.startswith(("http://", "https://")):
        deadline = time.monotonic() + CHECK_SECONDS
        try:
            with urllib.request.urlopen(health_request(uri), timeout=CHECK_SECONDS):
                pass
        except Exception as error:
            raise StoreUnreachable(f"cannot reach the MLflow tracking server {redact(uri)}: {_reason(error)}; "
                                   "start it (mlflow server ...) or pass another --tracking-uri") from None
        check_credentials(uri, timeout=max(deadline - time.monotonic(), 1.0))
        return
    if sqlite_path(uri) is not None:
        check_local_file(sqlite_path(uri), "MLflow store", uri)
    elif uri.startswith(("postgresql", "mysql", "mssql")):
        check_database(uri, "MLflow store")


def missing_store(tracking_uri: str) -> str | None:
    """Why the store cannot be read, or None: an SQLite file that is not there (opening it would
    create it), a tracking server that does not answer or refuses this process's credentials."""
    database = sqlite_path(tracking_uri)
    if database is not None and not database.is_file():
        return (f"no MLflow store at {database}; train a model first ({shell_command('python')} -m "
                "vae_lab.train) or pass --tracking-uri")
    if tracking_uri.startswith(("http://", "https://")):
        try:
            check_tracking_store(tracking_uri)
        except StoreUnreachable as error:
            return str(error)
    return None
