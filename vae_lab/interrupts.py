"""Ctrl-C and SIGTERM stop a command through KeyboardInterrupt, but never in the middle of a
store write, and never lost.

- **Not inside a store write.** An exception raised inside a database commit can leave the
  connection holding SQLite's write lock: the run's own KILLED status then waits on it and
  fails with "database is locked". Inside a `deferred()` block (the tracker's MLflow calls, a
  study's ask and tell) the first signal is remembered and raised when the block ends; a
  second one raises at once, for a store call that hangs.
- **Not lost.** Python drops an exception raised while a finalizer runs (a generator or a
  progress bar collected between two steps: "Exception ignored in ..."), and the study would
  train on. The training loop and the study's worker loop call `raise_if_lost()`, which raises
  again once a signal has arrived.

Both hold inside `interruptible()`, which the commands (and their worker processes) enter. A
Slurm array task also stops this way on the signal Slurm sends before a time limit
(`interruptible(also=WARNING_SIGNALS)`), and `received_signal()` tells it which signal it was.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import threading


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or a Slurm warning signal), handled like Ctrl-C (the running MLflow runs end
    KILLED). Unlike Ctrl-C, it reached only this process, not the worker processes it started."""


# What Slurm sends before it kills a job at its time limit (`sbatch --signal=USR1@90`; submitit's is USR2)
WARNING_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


_received: int | None = None  # the first signal that arrived inside `interruptible`
_raised = False  # an interrupt has been raised to the program (it may be handling it now)
_deferring = 0  # how deep in `deferred()` blocks the main thread is
_waiting: int | None = None  # a signal held back until the outermost `deferred()` block ends


def _interrupt(signum: int) -> KeyboardInterrupt:
    return KeyboardInterrupt() if signum == signal.SIGINT else Interrupted(f"signal {signal.Signals(signum).name}")


def _raise(signum: int):
    global _raised
    _raised = True
    raise _interrupt(signum)


def _on_signal(signum, frame):
    global _received, _waiting
    if _received is None:
        _received = signum
    if _deferring and _waiting is None:
        _waiting = signum
        return
    _raise(signum)


def _reset() -> None:
    global _received, _raised, _deferring, _waiting
    _received, _raised, _deferring, _waiting = None, False, 0, None


@contextlib.contextmanager
def interruptible(also: tuple[int, ...] = ()):
    """Within this block (in the main thread), SIGINT, SIGTERM and the signals `also` are handled
    as this module says; on leaving it, the previous handlers are back and nothing is remembered."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _reset()
    previous = {signum: signal.signal(signum, _on_signal) for signum in (signal.SIGINT, signal.SIGTERM, *also)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _reset()


@contextlib.contextmanager
def deferred():
    """A block that a first signal does not cut: it is raised when the outermost block ends
    (unless the program is already handling an interrupt)."""
    global _deferring, _waiting
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if _deferring == 0 and _waiting is not None:
        signum, _waiting = _waiting, None
        if not _raised:
            _raise(signum)


def deferring(function):
    """`function` run inside `deferred()`."""
    @functools.wraps(function)
    def call(*args, **kwargs):
        with deferred():
            return function(*args, **kwargs)
    return call


def received_signal() -> int | None:
    """The first signal that arrived inside the current `interruptible()` block, or None."""
    return _received


def raise_if_lost() -> None:
    """Raise the interrupt again once a signal has arrived: where it landed, a finalizer may
    have dropped it. (Called where the program is not handling one: between training steps,
    before claiming trials.)"""
    if _received is not None:
        _raise(_received)
