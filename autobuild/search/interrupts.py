"""Ctrl-C and SIGTERM during a search, delivered only outside database calls.

A KeyboardInterrupt raised in the middle of a storage call (SQLAlchemy fetching rows, a
commit) can leave a database cursor open; its frames stay alive in the exception's
traceback, and on SQLite the cursor's lock then blocks every write that follows, including
Optuna's own "this trial FAILED" (after the 60 s busy timeout: exit 1, the trial left
RUNNING). So a signal that lands inside storage code is re-delivered a moment later, when
the call is over, and the search stops where it can record how it stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType

from autobuild.errors import Terminated

__all__ = ["deliver_outside_storage"]

#: Modules whose frames must not be interrupted: the database layers and Optuna's writes.
STORAGE_MODULES = ("sqlalchemy", "sqlite3", "psycopg2", "psycopg", "pymysql",
                   "optuna.storages", "optuna.artifacts", "optuna.study._tell")
#: How long to wait before re-delivering a deferred signal.
RETRY_S = 0.05


def in_storage_call(frame: FrameType | None) -> bool:
    """Whether ``frame`` or one of its callers runs code of :data:`STORAGE_MODULES`."""
    while frame is not None:
        module = frame.f_globals.get("__name__") or ""
        if any(module == m or module.startswith(m + ".") for m in STORAGE_MODULES):
            return True
        frame = frame.f_back
    return False


def _handler(exception: type[KeyboardInterrupt]) -> signal.Handlers | object:
    def handle(signum: int, frame: FrameType | None) -> None:
        if in_storage_call(frame):
            timer = threading.Timer(RETRY_S, os.kill, (os.getpid(), signum))
            timer.daemon = True
            timer.start()
            return
        raise exception()

    return handle


@contextlib.contextmanager
def deliver_outside_storage() -> Iterator[None]:
    """Within the block, SIGINT raises KeyboardInterrupt and SIGTERM :class:`Terminated`,
    each only outside storage calls. Only the main thread can set handlers; elsewhere, and
    for a SIGINT the parent ignores (``nohup``, a job runner), nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _handler(Terminated))}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _handler(KeyboardInterrupt))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
