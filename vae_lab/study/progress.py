"""The study's progress bar: trials done out of the study's size, the best value so far."""

from __future__ import annotations

from optuna.trial import TrialState
from tqdm.auto import tqdm

from vae_lab.study import storage as store
from vae_lab.study.patient_storage import is_outage
from vae_lab.study.session import Session


class TrialsBar:
    """A bar over the study's trials, with the best value so far; refreshed from the storage."""

    def __init__(self, session: Session, enabled: bool):
        self.session = session
        self.total = session.spec.grid_size() if session.spec.is_grid else session.spec.n_trials
        self.bar = tqdm(total=self.total, desc=f"study {session.spec.name}", unit="trial", position=0,
                        leave=True, disable=not enabled, dynamic_ncols=True)
        self.refresh()

    def refresh(self) -> None:
        """Redraw from the storage; while the storage cannot be reached the bar stays as it was
        (the worker's own bookkeeping says when that has lasted too long)."""
        try:
            trials = store.real_trials(self.session.study)
        except Exception as error:
            if is_outage(error):
                return
            raise
        retried = {trial.user_attrs.get(store.RETRY_OF_ATTR) for trial in trials}
        finished = [trial for trial in trials if trial.state.is_finished() and trial.number not in retried]
        if self.session.spec.is_grid:
            done = len({trial.user_attrs.get(store.POINT_ATTR) for trial in finished})
        else:
            done = len(finished)
        self.bar.n = min(done, self.total)
        postfix = {}
        complete = [trial for trial in finished if trial.state == TrialState.COMPLETE]
        if complete and len(self.session.spec.objectives) == 1:
            postfix["best"] = f"{self.session.study.best_value:.4g}"
        elif complete:
            postfix["pareto"] = len(self.session.study.best_trials)
        failed = sum(trial.state == TrialState.FAIL for trial in finished)
        if failed:
            postfix["failed"] = failed
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
