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

A slot proves itself: its first line names the SHA-256 of the bytes after it and the fingerprint
of the config it was trained with (`config_fingerprint`: everything but how it runs, `HOW_IT_RUNS`).
A slot cut short, overwritten or from another config is skipped for the other slot; when neither
is good, `read_checkpoint` says why for each (`Found.problems`) and the caller starts over, saying
so. An unreachable store is not "no checkpoint": its error is raised.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from vae_lab.config import Config
from vae_lab.names import CHECKPOINT_DIR

SLOTS = ("a.pt", "b.pt")
MAGIC = "vae_lab-checkpoint"
FORMAT = 2
HOW_IT_RUNS = ("device", "threads", "train.progress", "tracking.uri")  # may change when a run continues


@dataclass
class Checkpoint:
    epoch: int  # epochs trained
    step: int  # optimizer steps taken
    sequence: int  # how many checkpoints this run has written before this one
    finished_training: bool  # epochs done or stopped early: what is left is test, eval, artifacts
    model_state: dict
    # {"step": float, "exp_avg": {name: tensor}, "exp_avg_sq": {...}}, and "steps": {name: float} for the
    # parameters whose step differs; a parameter that has taken no step has no entry (steps._named_adam_state)
    optimizer_state: dict | None
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


def config_fingerprint(config: Config) -> str:
    """What a checkpoint belongs to: a hash of every config key but `HOW_IT_RUNS`."""
    kept = {key: value for key, value in config.flat().items() if key not in HOW_IT_RUNS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Found:
    """What `read_checkpoint` found: the newest good checkpoint (or None), and why each slot that
    is there was not good (empty when every slot read back whole, or there were none)."""
    checkpoint: Checkpoint | None
    problems: list[str]

    def why_none(self) -> str:
        return "; ".join(self.problems) if self.problems else "no checkpoint"


def _compact_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """On the CPU, copied only where needed: torch.save writes a view's whole storage (a padded
    trial's slice of its widest tensor), and reads the tensor now, so one already there stays."""
    tensor = tensor.detach().to("cpu")
    return tensor.clone() if tensor.untyped_storage().nbytes() > tensor.nbytes else tensor


def _cpu(state: dict | None) -> dict | None:
    if state is None:
        return None
    return {name: _compact_cpu(value) if torch.is_tensor(value) else _cpu(value)
            if isinstance(value, dict) else value for name, value in state.items()}


def encode(checkpoint: Checkpoint, config: Config) -> bytes:
    """The slot's bytes: a header line (magic, format, checksum, config fingerprint), then torch.save's."""
    # its fields as they are: dataclasses.asdict would deep-copy every tensor first
    payload = {item.name: getattr(checkpoint, item.name) for item in fields(checkpoint)}
    for key in ("model_state", "optimizer_state", "best_state"):
        payload[key] = _cpu(payload[key])
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getvalue()
    header = f"{MAGIC} {FORMAT} sha256={hashlib.sha256(body).hexdigest()} config={config_fingerprint(config)}\n"
    return header.encode() + body


def decode(data: bytes, config: Config | None) -> Checkpoint:
    """The checkpoint in a slot's bytes; ValueError saying what is wrong with them."""
    header, _, body = data.partition(b"\n")
    fields = header.decode(errors="replace").split(" ")
    if len(fields) != 4 or fields[0] != MAGIC:
        raise ValueError("not a vae_lab checkpoint with a checksum (cut short, overwritten, or written by an "
                         "older vae_lab)")
    if fields[1] != str(FORMAT):
        raise ValueError(f"checkpoint format {fields[1]}, this vae_lab reads {FORMAT}")
    if fields[2] != f"sha256={hashlib.sha256(body).hexdigest()}":
        raise ValueError("its checksum does not match its contents (corrupt or cut short)")
    if config is not None and fields[3] != f"config={config_fingerprint(config)}":
        raise ValueError("it belongs to another config")
    return Checkpoint(**torch.load(io.BytesIO(body), map_location="cpu", weights_only=True))


def save_checkpoint(tracker, checkpoint: Checkpoint, config: Config) -> None:
    """Write `checkpoint` over the older slot of the run's `checkpoint/` artifact folder."""
    tracker.write_artifact(encode(checkpoint, config), CHECKPOINT_DIR, checkpoint.slot)


def read_checkpoint(client, run_id: str, config: Config | None = None,
                    at_most_epoch: int | None = None) -> Found:
    """The run's newest good checkpoint (of `config`, and of epoch `at_most_epoch` or before, when
    given), with why any other slot was not good. A store that cannot be reached raises."""
    from vae_lab.tracking.errors import is_store_error

    listed = {item.path for item in client.list_artifacts(run_id, CHECKPOINT_DIR)}
    newest, problems = None, []
    with tempfile.TemporaryDirectory() as folder:
        for slot in SLOTS:
            if f"{CHECKPOINT_DIR}/{slot}" not in listed:
                continue
            try:
                path = client.download_artifacts(run_id, f"{CHECKPOINT_DIR}/{slot}", folder)
                checkpoint = decode(Path(path).read_bytes(), config)
            except Exception as error:
                if is_store_error(error):
                    raise
                problems.append(f"slot {slot}: {str(error).splitlines()[0] if str(error) else type(error).__name__}")
                continue
            if at_most_epoch is not None and checkpoint.epoch > at_most_epoch:
                continue
            if newest is None or checkpoint.sequence > newest.sequence:
                newest = checkpoint
    return Found(newest, problems)


def load_checkpoint(client, run_id: str, config: Config | None = None,
                    at_most_epoch: int | None = None) -> Checkpoint | None:
    """The run's newest good checkpoint, or None (`read_checkpoint` says why)."""
    return read_checkpoint(client, run_id, config, at_most_epoch).checkpoint
