"""Ctrl-C and SIGTERM (vae_lab.interrupts): never in the middle of a store write, never lost.
Real signals, sent to this process's main thread."""

import signal
import threading

import pytest

from vae_lab.interrupts import Interrupted, deferred, interruptible, raise_if_lost


def send(signum: int = signal.SIGTERM) -> None:
    signal.pthread_kill(threading.main_thread().ident, signum)  # its handler runs before this returns


def test_a_signal_inside_a_store_write_is_raised_when_the_write_ends():
    done = []
    with interruptible():
        with pytest.raises(Interrupted):
            with deferred():
                with deferred():  # nested: the outermost block's end raises
                    send()
                    done.append("inner write")
                done.append("outer write")
    assert done == ["inner write", "outer write"]


def test_a_second_signal_cuts_a_write_that_hangs():
    done = []
    with interruptible():
        with pytest.raises(KeyboardInterrupt):
            with deferred():
                send(signal.SIGINT)
                done.append("after the first")
                send(signal.SIGINT)
                done.append("after the second")
    assert done == ["after the first"]


def test_while_the_program_handles_an_interrupt_its_writes_are_not_cut():
    with interruptible():
        with pytest.raises(Interrupted):
            send()
        with deferred():  # e.g. the run's KILLED status, written while handling it
            send()
        # and a signal that a finalizer dropped is raised again where the loop asks
        with pytest.raises(Interrupted):
            raise_if_lost()


def test_outside_the_block_nothing_is_remembered_and_the_handlers_are_back():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with interruptible():
        with pytest.raises(Interrupted):
            send()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    raise_if_lost()  # does not raise
    with deferred():
        pass
