"""A study as one worker process holds it: what every worker shares (`Session`, a plain record).

`runner.open_session` makes one (creating or joining the study); a worker's own counters are
`workers.Worker`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna
from mlflow.tracking import MlflowClient

from vae_lab.data.cache import DataCache
from vae_lab.study.spec import StudySpec


@dataclass
class SweepSettings:
    """Everything a worker process needs to join the study (picklable)."""
    spec: StudySpec
    tracking_uri: str
    storage_url: str
    progress: bool = True
    new_study: bool = False
    workers_here: int = 1  # the --workers of the command on this machine: they share its CPUs


@dataclass
class Session:
    """One process's handle on the study: the Optuna study and storage, the MLflow client and
    the study's parent run, and the data its trials share."""
    settings: SweepSettings
    study: optuna.Study
    storage: Any
    client: MlflowClient
    parent_run_id: str
    data_cache: DataCache

    @property
    def spec(self) -> StudySpec:
        return self.settings.spec
