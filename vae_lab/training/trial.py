"""What the engine trains: a trial's spec (the one way in), its state while it trains, and
its outcome.

    specs = [TrialSpec(config, run_name="...", tags={...}, resume=None, on_epoch_end=None), ...]
    outcomes = vae_lab.training.run.run_trials(specs, data=data)   # a RunResult or an exception each
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from vae_lab import names
from vae_lab.config import Config
from vae_lab.models.autoencoders import Autoencoder
from vae_lab.tracking.errors import StoreUnavailable, is_store_error
from vae_lab.training.checkpoints import Checkpoint, Resume

EpochCallback = Callable[[int, dict[str, float]], None]
TrialEndCallback = Callable[[int, Any], None]


@dataclass
class TrialSpec:
    """One trial to train: its config, its MLflow run's name and extra tags, the run it
    continues (`Resume`: a killed run's id and checkpoint), a callback after each epoch
    (`on_epoch_end(epoch, metrics)`; raising optuna.TrialPruned prunes it), and `claim_lost`,
    asked at every step: a reason to stop now (ClaimLost: the run ends KILLED, resumable from
    its checkpoint), or None to go on."""

    config: Config
    run_name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    resume: Resume | None = None
    on_epoch_end: EpochCallback | None = None
    claim_lost: Callable[[], str | None] | None = None

    @property
    def resumed_epoch(self) -> int:
        return self.resume.epoch if self.resume else 0


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class ClaimLost(StoreUnavailable):
    """The trial may no longer be this process's to train (its study's storage could not renew
    its claim): stopped before another worker may take it over, resumable from its checkpoint."""


@dataclass
class RunResult:
    metrics: dict[str, float]
    run_id: str | None
    model: Autoencoder = field(repr=False)


def run_status_for(error: BaseException) -> str:
    """MLflow status for a run stopped by `error`: interrupted or pruned runs, and runs cut off
    from their store (resumable), are KILLED."""
    import optuna  # pruning is a study's; importing Optuna for a plain run costs half a second

    if isinstance(error, (KeyboardInterrupt, optuna.TrialPruned)) or is_store_error(error):
        return "KILLED"
    return "FAILED"


def check_finite(values: dict[str, float], step: int, epoch: int) -> None:
    bad = {name: value for name, value in values.items() if not math.isfinite(value)}
    if bad:
        name, value = next(iter(bad.items()))
        raise TrainingDiverged(
            f"training diverged: {name} is {value} at step {step} (epoch {epoch}); "
            "try a lower train.lr, train.grad_clip>0 or loss.kl_warmup_steps>0"
        )


@dataclass
class Trial:
    """One model's run through the engine, and its early-stopping state."""

    index: int  # position in the caller's list
    spec: TrialSpec
    model: Autoencoder | None = None  # its initial (or resumed) weights, until the engine stacks them
    tracker: Any = None
    running_count: int = 0  # images summed in the engine's running sums since the last log
    last_train: dict[str, float] = field(default_factory=dict)
    last_epoch: dict[str, float] = field(default_factory=dict)  # throughput of the last epoch
    val: dict[str, float] = field(default_factory=dict)  # val/* of the weights it will keep
    best_val_loss: float = math.inf
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None  # kept only under early stopping
    epochs_trained: int = 0
    last_step: int = 0
    finished_training: bool = False  # what is left is test/*, eval/*, artifacts
    checkpoints_written: int = 0
    outcome: Any = None  # RunResult or the exception that stopped it
    latent_frames: list = field(default_factory=list)  # (step, posterior means) for latents/evolution.gif

    @property
    def config(self) -> Config:
        return self.spec.config

    @property
    def on_epoch_end(self) -> EpochCallback | None:
        return self.spec.on_epoch_end

    @property
    def checkpoint(self) -> Checkpoint | None:
        return self.spec.resume.checkpoint if self.spec.resume else None

    @property
    def patience(self) -> int:
        return self.config.train.early_stopping_patience

    def restore(self, checkpoint: Checkpoint, device: torch.device) -> None:
        """Take up the early-stopping state and counters a checkpoint recorded."""
        self.epochs_trained, self.last_step = checkpoint.epoch, checkpoint.step
        self.finished_training = checkpoint.finished_training
        self.checkpoints_written = checkpoint.sequence + 1
        self.best_val_loss, self.best_epoch = checkpoint.best_val_loss, checkpoint.best_epoch
        self.best_state = None if checkpoint.best_state is None else {
            name: value.to(device) for name, value in checkpoint.best_state.items()}
        self.val, self.last_train, self.last_epoch = checkpoint.val, checkpoint.last_train, checkpoint.last_epoch

    def end_of_epoch(self, epoch: int, step: int, val: dict[str, float], state_of: Callable[[], dict]) -> bool:
        """Record the epoch; True when early stopping says this trial is done."""
        self.epochs_trained, self.last_step = epoch, step
        loss = val.get(names.VAL_LOSS)
        if loss is None:  # no validation split: the last epoch is kept
            self.best_epoch = epoch
            return False
        if loss < self.best_val_loss:
            self.best_val_loss, self.best_epoch = loss, epoch
            if self.patience:
                self.best_state, self.val = state_of(), dict(val)
        if not self.patience:
            self.val = dict(val)
            return False
        return epoch - self.best_epoch >= self.patience
