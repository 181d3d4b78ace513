"""Ctrl-C and SIGTERM during a search reach it only outside database calls (a
KeyboardInterrupt inside SQLAlchemy left a SQLite cursor, and its lock, open), but never
wait without bound."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from autobuild.errors import Terminated
from autobuild.search import interrupts
from autobuild.search.interrupts import deliver_outside_storage, in_storage_call

SLOW_CALL = """
def call(signals, seconds):
    for signum in signals:  # land in the middle of this "database call"
        os.kill(os.getpid(), signum)
        time.sleep(0.1)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.01)
    return "done"
"""


def _storage_call():
    """A function whose module is named like SQLAlchemy's, as a storage call's frames are."""
    namespace = {"__name__": "sqlalchemy.engine.fake", "os": os, "time": time}
    exec(SLOW_CALL, namespace)
    return namespace["call"]


@pytest.fixture
def default_sigint():
    # A job runner may start the tests with SIGINT ignored; a terminal's Ctrl-C raises.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize(("signum", "raised"), [(signal.SIGINT, KeyboardInterrupt),
                                                (signal.SIGTERM, Terminated)])
def test_a_signal_in_a_storage_call_arrives_when_the_call_is_over(default_sigint, signum,
                                                                  raised) -> None:
    finished = []
    with pytest.raises(raised):
        with deliver_outside_storage():
            finished.append(_storage_call()([signum], 0.2))
            time.sleep(5)  # the re-delivered signal ends this
    assert finished == ["done"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_a_signal_elsewhere_arrives_at_once(default_sigint) -> None:
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with deliver_outside_storage():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    assert time.monotonic() - start < 2


def test_a_second_ctrl_c_does_not_wait(default_sigint) -> None:
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with deliver_outside_storage():
            _storage_call()([signal.SIGINT, signal.SIGINT], 5)
    assert time.monotonic() - start < 2


def test_a_hanging_call_is_interrupted_after_the_cap(default_sigint, monkeypatch) -> None:
    monkeypatch.setattr(interrupts, "MAX_DEFER_S", 0.3)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with deliver_outside_storage():
            _storage_call()([signal.SIGINT], 5)
    assert 0.3 <= time.monotonic() - start < 2


def test_a_signal_still_deferred_at_the_end_of_the_block_is_raised_after_it(
        default_sigint, monkeypatch) -> None:
    monkeypatch.setattr(interrupts, "RETRY_S", 5.0)  # the re-delivery would come too late
    with pytest.raises(Terminated):
        with deliver_outside_storage():
            _storage_call()([signal.SIGTERM], 0.1)
    assert signal.getsignal(signal.SIGTERM) is not None
    time.sleep(0.2)  # nothing is re-sent later (the timer was cancelled)


def test_an_ignored_sigint_stays_ignored() -> None:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with deliver_outside_storage():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_storage_frames_are_recognised_by_module() -> None:
    assert not in_storage_call(sys._getframe())
    frames: list = []
    namespace = {"__name__": "optuna.storages._rdb.storage", "sys": sys, "frames": frames}
    exec("def f():\n    frames.append(sys._getframe())\n", namespace)
    namespace["f"]()
    assert in_storage_call(frames[0])
    namespace["__name__"] = "optuna.storagesque"  # a prefix of a name is not the module
    namespace["f"]()
    assert not in_storage_call(frames[1])
