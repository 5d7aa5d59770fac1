"""A trial's whole training state, kept as an artifact of its own MLflow run so that any worker
(on any machine that reaches the tracking server) can continue the run where it stopped.

    checkpoint = load_checkpoint(client, run_id)      # the newest readable one, or None
    save_checkpoint(tracker, checkpoint)              # overwrites the older of two slots

What a checkpoint holds (`torch.load(weights_only=True)` reads it back): the model's and Adam's
state, the data-order and noise generators of the trial's seed, epoch and step, the early-stopping
state, the last train/* and throughput values, and the metrics logged since the last flush.
The engine writes a checkpoint *before* it sends those metrics to the store, so a run
continued from it re-sends exactly the metrics the store may have missed (the tracker skips
any it already holds): no gap and no duplicate in the metric histories.

Two slots (`checkpoint/a.pt`, `checkpoint/b.pt`) are written in turn, so a process killed while
it uploads one still leaves the other, older but whole. Both are removed when the run finishes
(`vae_lab.tracking.tracker.RunTracker.end`), so a finished run keeps no training state, only its model.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from vae_lab.names import CHECKPOINT_DIR

SLOTS = ("a.pt", "b.pt")
FORMAT = 1


@dataclass
class Checkpoint:
    epoch: int  # epochs trained
    step: int  # optimizer steps taken
    sequence: int  # how many checkpoints this run has written before this one
    finished_training: bool  # epochs done or stopped early: what is left is test, eval, artifacts
    model_state: dict
    optimizer_state: dict | None  # {"step": float, "exp_avg": {name: tensor}, "exp_avg_sq": {...}}
    order_generator: torch.Tensor
    noise_generator: torch.Tensor
    best_val_loss: float
    best_epoch: int
    best_state: dict | None
    val: dict
    last_train: dict
    last_epoch: dict
    pending_metrics: list = field(default_factory=list)  # [key, value, timestamp_ms, step] not yet flushed

    @property
    def slot(self) -> str:
        return SLOTS[self.sequence % len(SLOTS)]


@dataclass
class Resume:
    """A run to continue: its id, and its newest checkpoint (None: start it over from epoch 0)."""
    run_id: str
    checkpoint: Checkpoint | None

    @property
    def epoch(self) -> int:
        return self.checkpoint.epoch if self.checkpoint else 0


def _cpu(state: dict | None) -> dict | None:
    if state is None:
        return None
    return {name: value.detach().to("cpu", copy=True) if torch.is_tensor(value) else _cpu(value)
            if isinstance(value, dict) else value for name, value in state.items()}


def save_checkpoint(tracker, checkpoint: Checkpoint) -> None:
    """Upload `checkpoint` over the older slot of the run's `checkpoint/` artifact folder."""
    payload = {"format": FORMAT, **asdict(checkpoint)}
    for key in ("model_state", "optimizer_state", "best_state"):
        payload[key] = _cpu(payload[key])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / checkpoint.slot
        torch.save(payload, path)
        tracker.log_artifact(path, CHECKPOINT_DIR)


def load_checkpoint(client, run_id: str, at_most_epoch: int | None = None) -> Checkpoint | None:
    """The run's newest checkpoint that reads back whole (of epoch `at_most_epoch` or before,
    when given), or None when it has none."""
    try:
        listed = {item.path for item in client.list_artifacts(run_id, CHECKPOINT_DIR)}
    except Exception:  # no artifact folder yet
        return None
    newest = None
    with tempfile.TemporaryDirectory() as folder:
        for slot in SLOTS:
            if f"{CHECKPOINT_DIR}/{slot}" not in listed:
                continue
            try:
                path = client.download_artifacts(run_id, f"{CHECKPOINT_DIR}/{slot}", folder)
                payload = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # cut short by a kill while it was written: the other slot is whole
                continue
            if payload.pop("format", None) != FORMAT:
                continue
            checkpoint = Checkpoint(**payload)
            if at_most_epoch is not None and checkpoint.epoch > at_most_epoch:
                continue
            if newest is None or checkpoint.sequence > newest.sequence:
                newest = checkpoint
    return newest
