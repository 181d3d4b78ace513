"""Ctrl-C and SIGTERM during a search, delivered only outside database calls.

A KeyboardInterrupt raised in the middle of a storage call (SQLAlchemy fetching rows, a
commit) can leave a database cursor open; its frames stay alive in the exception's
traceback, and on SQLite the cursor's lock then blocks every write that follows, including
Optuna's own "this trial FAILED" (after the 60 s busy timeout: exit 1, the trial left
RUNNING). So a signal that lands inside storage code is re-delivered when the call is over
(polled every :data:`RETRY_S`), and the search stops where it can record how it stopped.
A second signal, or a call still running after :data:`MAX_DEFER_S`, is delivered at once:
a database that hangs never makes a worker impossible to stop.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType, TracebackType

from autobuild.errors import Terminated

__all__ = ["deliver_outside_storage", "in_storage_call"]

#: Modules whose frames must not be interrupted: the database layers and Optuna's writes.
STORAGE_MODULES = ("sqlalchemy", "sqlite3", "psycopg2", "psycopg", "pymysql",
                   "optuna.storages", "optuna.artifacts", "optuna.study._tell")
#: How long to wait before re-delivering a deferred signal.
RETRY_S = 0.05
#: The longest a signal waits for a storage call to end.
MAX_DEFER_S = 5.0


def in_storage_call(frame: FrameType | None) -> bool:
    """Whether ``frame`` or one of its callers runs code of :data:`STORAGE_MODULES`."""
    while frame is not None:
        module = frame.f_globals.get("__name__") or ""
        if any(module == m or module.startswith(m + ".") for m in STORAGE_MODULES):
            return True
        frame = frame.f_back
    return False


def _exception(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


class deliver_outside_storage:  # noqa: N801 - used as a function: `with deliver_outside_storage():`
    """Within the block, SIGINT raises KeyboardInterrupt and SIGTERM :class:`Terminated`,
    each outside storage calls. A signal still deferred when the block ends without an
    exception is raised then, after the handlers are restored. Only the main thread can set
    handlers; elsewhere, and for a SIGINT the parent ignores (``nohup``, a job runner),
    nothing changes."""

    def __init__(self) -> None:
        self.pending: int | None = None  # the deferred signal
        self.since = 0.0
        self.resent = False  # the next delivery is our re-delivery, not a new signal
        self.timer: threading.Timer | None = None
        self.previous: dict[int, object] = {}
        self.lock = threading.Lock()
        self.closing = False  # the block is ending: signals are only recorded

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.closing:  # raised by __exit__, after the handlers are restored
            self.pending = self.pending or signum
            return
        ours, self.resent = self.resent, False
        first = self.pending is None
        if in_storage_call(frame) and (
                first or (ours and time.monotonic() - self.since < MAX_DEFER_S)):
            if first:
                self.pending, self.since = signum, time.monotonic()
            self.timer = threading.Timer(RETRY_S, self._resend, (signum,))
            self.timer.daemon = True
            self.timer.start()
            return
        self._clear()  # outside storage, a second signal, or waited long enough
        raise _exception(signum)

    def _resend(self, signum: int) -> None:
        with self.lock:  # never after __exit__ has begun (it would meet the old handlers)
            if self.closing:
                return
            self.resent = True
            os.kill(os.getpid(), signum)

    def _clear(self) -> int | None:
        if self.timer is not None:
            self.timer.cancel()
        pending, self.pending, self.timer = self.pending, None, None
        return pending

    def __enter__(self) -> deliver_outside_storage:
        if threading.current_thread() is threading.main_thread():
            self.previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                self.previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        with self.lock:
            self.closing = True
        timer = self.timer
        if timer is not None:
            timer.cancel()
            timer.join()
        try:
            for signum, handler in self.previous.items():
                # (a signal sent before this point runs our handler here: it is recorded)
                signal.signal(signum, handler)  # type: ignore[arg-type]
        finally:
            pending, self.pending, self.timer = self.pending, None, None
        if pending is not None and kind is None:
            raise _exception(pending)
