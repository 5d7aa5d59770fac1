"""Shared fixtures: every test gets its own MLflow store in a temporary folder.

The tests write nothing outside temporary folders: HOME (where vae_lab, matplotlib and the
browser keep their caches) is a temporary folder for the whole session and every process it
starts, and the session fails if the checkout's own store or reports folder gained a file.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
SESSION_HOME = tempfile.mkdtemp(prefix="vae_lab-tests-home-")
os.environ["HOME"] = SESSION_HOME

import pytest  # noqa: E402

CHECKOUT = Path(__file__).resolve().parents[1]
CHECKOUT_OUTPUTS = [CHECKOUT / "mlruns", CHECKOUT / "reports"]


def _files_in_checkout_outputs() -> set[Path]:
    return {path for folder in CHECKOUT_OUTPUTS if folder.is_dir() for path in folder.rglob("*")
            if path.name != ".gitkeep"}


_FILES_BEFORE = _files_in_checkout_outputs()


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(SESSION_HOME, ignore_errors=True)
    written = sorted(_files_in_checkout_outputs() - _FILES_BEFORE)
    if written:
        shown = ", ".join(str(path.relative_to(CHECKOUT)) for path in written[:5])
        session.config.get_terminal_writer().line(
            f"the tests wrote {len(written)} file(s) into the checkout ({shown}); they must use temporary folders",
            red=True)
        session.exitstatus = 1

TINY_RUN = [
    "data.name=mnist5k",
    "data.train_limit=512",
    "data.test_limit=256",
    "model.hidden_dims=[64]",
    "model.conv_channels=[8,16,16]",
    "model.latent_dim=4",
    "train.epochs=1",
    "train.batch_size=64",
    "train.progress=false",
    "eval.iwae_samples=4",
    "eval.iwae_points=64",
]


def run_in_fresh_process(code: str) -> None:
    """Run Python `code` in a new interpreter (what a fresh process imports); fail with its stderr."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


# an AE that memorizes its 90 training images: val/loss turns up after 15-20 epochs
OVERFITS = ["data.train_limit=100", "model.name=ae", "model.hidden_dims=[256]", "model.latent_dim=16",
            "train.lr=1e-2", "train.batch_size=32", "train.epochs=40"]


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch) -> str:
    """An SQLite MLflow store in tmp_path, also set as MLFLOW_TRACKING_URI for subprocesses."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def tiny_overrides(tracking_uri) -> list[str]:
    """Overrides for a run of a few seconds on a slice of mnist5k, tracked in the temp store."""
    return [*TINY_RUN, f"tracking.uri={tracking_uri}"]
