"""Where a store is, how its URI reads, and how a URI is shown: the one place for tracking URIs.

    resolve_tracking_uri("")                 # $MLFLOW_TRACKING_URI, else sqlite:///<checkout>/mlruns/mlflow.db
    sqlite_path("sqlite:////abs/m.db")       # Path('/abs/m.db'); None for any other URI
    redact("postgresql://u:secret@db/x")     # 'postgresql://u:***@db/x' (MLflow and Optuna URIs alike)
"""

from __future__ import annotations

import os
import re
from pathlib import Path


SQLITE_PREFIX = "sqlite:///"
_PASSWORD_IN_NETLOC = re.compile(r"(://[^:/@?#]+):[^@/?#]*@")
_PASSWORD_IN_QUERY = re.compile(r"([?&](?:password|passwd|pwd)=)[^&#]*", re.IGNORECASE)


def sqlite_path(uri: str) -> Path | None:
    """The database file of an `sqlite:///` URI (absolute as written), else None."""
    if uri.startswith(SQLITE_PREFIX):
        return Path(uri[len(SQLITE_PREFIX):])
    return None


def redact(uri: str) -> str:
    """The URI with any password replaced by `***` (user:password@host, ?password=...), for
    everything that is printed, tagged, logged or served."""
    return _PASSWORD_IN_QUERY.sub(r"\1***", _PASSWORD_IN_NETLOC.sub(r"\1:***@", uri))


def project_root() -> Path:
    """The checkout this package lives in (when installed editable), else the current folder."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file():
        return checkout
    return Path.cwd().resolve()


def default_store_dir() -> Path:
    return project_root() / "mlruns"


def default_tracking_uri() -> str:
    """An absolute SQLite URI in mlruns/ (MLflow's own default is relative to the cwd)."""
    return f"{SQLITE_PREFIX}{default_store_dir() / 'mlflow.db'}"


def resolve_tracking_uri(configured: str = "") -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
