"""Shared fixtures: every test gets its own MLflow store in a temporary folder."""

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

import pytest  # noqa: E402

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
