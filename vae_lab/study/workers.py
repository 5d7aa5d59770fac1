"""Which worker runs a trial, whether it is still alive, and the helper processes of `--workers N`.

A worker is named `host:pid:token` (`worker_id`): the random token keeps two containers that
share a hostname and a pid apart. Beside it a trial records the worker's machine (`machine_key`:
the kernel's boot id and the pid namespace), the only place where its pid can be checked. A
trial is stale when its worker's process is gone (same machine), or when its heartbeat,
refreshed every `heartbeat_seconds()` (recorded on the trial), is older than STALE_AFTER beats
(any machine).

A worker that cannot renew a trial's heartbeat for KEEP_CLAIM_FOR beats stops training it
(`Heartbeat.lost`, asked by the engine at every step) before any other worker may call it
stale: no trial is ever trained by two workers at once.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial

from vae_lab.study.patient_storage import impatient
from vae_lab.study.session import Session
from vae_lab.study.storage import HEARTBEAT_ATTR, HEARTBEAT_EVERY_ATTR, MACHINE_ATTR, WORKER_ATTR
from vae_lab.tracking.errors import describe, env_seconds

HEARTBEAT_ENV = "VAE_LAB_HEARTBEAT_SECONDS"
DEFAULT_HEARTBEAT_SECONDS = 20.0
STALE_AFTER = 6  # beats missed before another worker takes a trial over (120 s by default)
KEEP_CLAIM_FOR = 4  # beats that could not be renewed before the worker stops the trial (80 s)
RETRY_BEAT_SECONDS = 2.0  # how soon a failed beat is tried again
JOIN_WAIT_SECONDS = 300  # how long the command's own worker waits for its --workers helpers to join

_identity: dict[int, str] = {}


@dataclass
class Worker:
    """This process as a worker of the study: the session and its own counters."""
    session: Session
    my_trials: set[int] = field(default_factory=set)  # trials it claimed (never stale to itself)
    point_batch_keys: dict = field(default_factory=dict)  # grid point -> batch key, cached
    batch_costs: dict = field(default_factory=dict)  # batch key -> batching.relative_cost, cached
    deadline: float | None = None  # study.timeout, from when this worker started
    failures: int = 0  # trials that failed for good (not stopped from outside)
    store_down: BaseException | None = None  # the store error that ended a trial: this worker stops

    @property
    def spec(self):
        return self.session.spec  # pid -> worker id (a spawned helper is a new process with its own)


def worker_id() -> str:
    pid = os.getpid()
    if pid not in _identity:
        _identity[pid] = f"{socket.gethostname()}:{pid}:{uuid.uuid4().hex[:8]}"
    return _identity[pid]


def slurm_task() -> str | None:
    """The Slurm job this process runs in, as scontrol names it (ARRAY_TASK for an array task), or None."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def machine_key() -> str:
    """Where a pid names one process: this kernel boot and this pid namespace ('' if unknown)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    return f"{boot}/{namespace}"


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped) is gone too
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def heartbeat_seconds() -> float:
    """How often a running trial's heartbeat is renewed: $VAE_LAB_HEARTBEAT_SECONDS, else 20
    (each trial records its worker's, so workers with different settings judge each other right)."""
    from vae_lab.config import ConfigError

    seconds = env_seconds(HEARTBEAT_ENV, DEFAULT_HEARTBEAT_SECONDS)
    if seconds < 1:
        raise ConfigError(f"${HEARTBEAT_ENV}={seconds:g} is too short (allowed: 1 second or more)")
    return seconds


def identity_attrs() -> dict:
    return {WORKER_ATTR: worker_id(), MACHINE_ATTR: machine_key(), HEARTBEAT_ATTR: time.time(),
            HEARTBEAT_EVERY_ATTR: heartbeat_seconds()}


def mark_claimed(storage, claimed_id: int) -> None:
    for key, value in identity_attrs().items():
        storage.set_trial_user_attr(claimed_id, key, value)


def process_gone(worker: str, machine: str | None) -> str | None:
    """Why the process named `worker` is known to be gone, or None when it may be alive."""
    host, pid, token = (worker.split(":") + ["", "", ""])[:3]
    if not pid.isdigit():
        return None
    if machine:
        if machine != machine_key():
            return None  # another machine or container: only its heartbeat can tell
    elif host != socket.gethostname():  # recorded by an older vae_lab as host:pid
        return None
    if int(pid) == os.getpid():
        return None if worker == worker_id() or not token else f"worker {worker} restarted"
    if not pid_alive(int(pid)):
        return f"worker {worker} is gone"
    return None


def stale_reason(trial: FrozenTrial, my_trials: set[int], now: float | None = None) -> str | None:
    """Why a RUNNING trial has no live worker any more, or None if it may still be running."""
    if trial.number in my_trials:
        return None
    now = time.time() if now is None else now
    worker = trial.user_attrs.get(WORKER_ATTR)
    if worker:
        gone = process_gone(worker, trial.user_attrs.get(MACHINE_ATTR))
        if gone:
            return gone
    started = trial.datetime_start.timestamp() if trial.datetime_start else now
    last_sign = float(trial.user_attrs.get(HEARTBEAT_ATTR, started))
    every = float(trial.user_attrs.get(HEARTBEAT_EVERY_ATTR, DEFAULT_HEARTBEAT_SECONDS))
    if now - last_sign > STALE_AFTER * every:
        return f"no heartbeat from {worker or 'its worker'} for {now - last_sign:.0f} s"
    return None


class Heartbeat:
    """Renews a running trial's heartbeat attribute from a background thread; `lost()` says
    when this worker must stop training it."""

    def __init__(self, storage, trial_id_: int):
        self.storage, self.trial_id = storage, trial_id_
        self.every = heartbeat_seconds()
        self._renewed = time.monotonic()
        self._ended_elsewhere = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="vae_lab-heartbeat")

    def __enter__(self) -> "Heartbeat":
        mark_claimed(self.storage, self.trial_id)
        self._renewed = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def lost(self) -> str | None:
        """Why this worker must stop training the trial now, or None."""
        if self._ended_elsewhere:
            return "another worker ended the trial (its heartbeat was late)"
        silent = time.monotonic() - self._renewed
        if silent > KEEP_CLAIM_FOR * self.every:
            return (f"its heartbeat could not be renewed in the Optuna storage for {silent:.0f} s "
                    f"(another worker may take it over after {STALE_AFTER * self.every:.0f} s)")
        return None

    def _beat(self) -> None:
        beating = impatient(self.storage)  # an outage must show, not be waited out
        wait, failing = self.every, False
        while not self._stop.wait(wait):
            try:
                beating.set_trial_user_attr(self.trial_id, HEARTBEAT_ATTR, time.time())
            except optuna.exceptions.UpdateFinishedTrialError:
                self._ended_elsewhere = True  # told (by us: nobody asks any more; or by a repair)
                return
            except Exception as error:  # the storage cannot be reached: try again soon
                if not failing:  # said once per outage
                    logging.getLogger(__name__).warning(
                        "could not renew the heartbeat of a trial (%s); trying again every %.0f s, training goes on",
                        describe(error), RETRY_BEAT_SECONDS)
                wait, failing = min(self.every, RETRY_BEAT_SECONDS), True
                continue
            self._renewed, wait, failing = time.monotonic(), self.every, False


class Helpers:
    """The extra worker processes of `--workers N` (spawned), and which of them crashed.

    Each gets `(settings, joined, busy, slot)` and sets the event `joined` once it has opened the study;
    `wait_until_joined` lets the command start its own worker with them rather than before them
    (a short study would otherwise be over before a helper had imported torch). `busy` holds a
    flag per worker of this machine (slot 0 the command's own, then one per helper), cleared
    when the study has no trial left for it or it crashed; their sum sizes the threads."""

    def __init__(self, target, settings, count: int):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.joined = [context.Event() for _ in range(count)]
        self.busy = context.Array("b", [1] * (count + 1), lock=False)  # one byte each: written whole
        self.processes = [context.Process(target=target, args=(settings, joined, self.busy, slot), daemon=False)
                          for slot, joined in enumerate(self.joined, start=1)]
        self.crashed: list = []
        for process in self.processes:
            process.start()

    def wait_until_joined(self, at_most: float = JOIN_WAIT_SECONDS) -> None:
        """Until every helper has opened the study, or stopped (or `at_most` seconds: a helper
        stuck on its way in does not hold the study up; it joins late)."""
        deadline = time.monotonic() + at_most
        for process, joined in zip(self.processes, self.joined):
            while not joined.wait(timeout=0.2) and process.is_alive() and time.monotonic() < deadline:
                pass

    def alive(self) -> bool:
        return any(process.is_alive() for process in self.processes)

    def newly_crashed(self) -> list:
        """Helpers that ended with a non-zero exit code since the last call."""
        new = [process for process in self.processes if not process.is_alive() and process.exitcode not in (0, None)
               and process not in self.crashed]
        self.crashed.extend(new)
        for process in new:  # killed before it could clear its flag
            self.busy[self.processes.index(process) + 1] = 0
        return new

    def wait(self, timeout: float) -> None:
        from multiprocessing.connection import wait

        live = [process.sentinel for process in self.processes if process.is_alive()]
        if live:
            wait(live, timeout=timeout)

    def stop(self, terminate: bool) -> None:
        """After an interrupt: Ctrl-C reached them too; SIGTERM reached only us."""
        for process in self.processes:
            if terminate and process.is_alive():
                process.terminate()
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
                process.join(timeout=10)
