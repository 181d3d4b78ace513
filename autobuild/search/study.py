"""Studies: where they are stored, how they are created, seeded, continued and run.

Storage is any SQLAlchemy URL Optuna's RDB storage takes; the default is an embedded SQLite
file ``studies/<name>.db`` (one worker). Trials' plans (and weights, when the space keeps
them) go to a file-system artifact store beside it, ``studies/<name>-artifacts/``.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from typing import Any

import optuna

from autobuild.errors import AutobuildError

__all__ = ["PID_NAMESPACE_KEY", "artifact_dir", "check_url", "check_writable", "default_storage",
           "fail_dead_trials", "finished", "holds_no_study", "load_study", "mask_url",
           "open_storage", "pid_namespace", "sqlite_file", "study_paths"]

DONE = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
#: Heartbeats: a running trial whose worker has not written for GRACE_S is failed and
#: re-queued with the same parameters (RetryHeartbeatStaleTrialCallback).
HEARTBEAT_S, GRACE_S = 10, 60


def quiet_optuna() -> None:
    """Optuna's INFO lines, its tracebacks of failed trials and experimental-feature warnings
    would drown the progress lines; autobuild prints its own (and records fail reasons)."""
    import warnings

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def mask_url(url: str) -> str:
    """The URL with its password replaced by ***."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def default_storage(name: str) -> str:
    return f"sqlite:///{os.path.abspath(os.path.join('studies', name + '.db'))}"


def artifact_dir(storage_url: str, study_name: str, given: str | None = None) -> str:
    """The artifact directory: ``given``, else beside a SQLite file, else
    ``studies/<study>-artifacts`` (every worker must reach it: see docs/search.md)."""
    if given:  # (an S3 URL is not a path: abspath would turn it into one)
        return given if given.startswith("s3://") else os.path.abspath(given)
    if storage_url.startswith("sqlite:///"):
        path = storage_url[len("sqlite:///"):]
        return os.path.splitext(os.path.abspath(path))[0] + "-artifacts"
    return os.path.abspath(os.path.join("studies", f"{study_name}-artifacts"))


def sqlite_file(url: str) -> str:
    """The database file of a ``sqlite:///`` URL ("" for other databases and memory)."""
    if not url.startswith("sqlite:///"):
        return ""
    path = _sqlite_path(url)
    return "" if path in ("", ":memory:") else path


def _sqlite_path(url: str) -> str:
    """The file a sqlite URL names, as SQLAlchemy reads it (``?`` starts the query)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).database or ""
    except ArgumentError as exc:
        raise AutobuildError(f"--storage {url!r} is not a database URL: {exc}") from None


def _check_study_file(path: str, create: bool) -> None:
    """Refuse a SQLite file that is not Optuna's: Optuna would add its tables to someone
    else's database (or, for the commands that only read, to an empty file)."""
    import sqlite3
    import urllib.parse

    try:
        uri = f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro"  # (read only)
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
            tables = {row[0] for row in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as exc:
        raise AutobuildError(f"{path!r} is not a study database: {exc}") from None
    if "studies" in tables or (create and not tables):
        return
    what = f"a SQLite database of other tables ({', '.join(sorted(tables)[:3])})" if tables \
        else "an empty file"
    raise AutobuildError(f"{path!r} is not a study database but {what}; it is left as it is "
                         "(check --storage / --study)")


def study_paths(url: str, study: optuna.Study, artifacts: str | None = None) -> list[str]:
    """The study's database file and its local artifact stores (every trial's plan and kept
    weights): the one ``artifacts`` or the default names, and the one the study was created
    with. A directory replaced whole must hold none of them."""
    name = study.study_name
    folders = [artifact_dir(url, name, artifacts), artifact_dir(url, name),
               study.user_attrs.get("artifacts") or ""]
    return [sqlite_file(url)] + [f for f in folders if f and not f.startswith("s3://")]


def check_url(url: str) -> None:
    """Refuse what is not a database URL, and an in-memory SQLite database (a search would
    run, then lose every result), before any work."""
    if not isinstance(url, str) or "://" not in url:
        raise AutobuildError(f"--storage must be a database URL such as sqlite:///studies/x.db "
                             f"or postgresql+psycopg://user@host/db, got {url!r}")
    if url.startswith("sqlite") and not sqlite_file(url):
        raise AutobuildError(f"--storage {mask_url(url)}: an in-memory SQLite database is lost "
                             "when the command ends (and other commands cannot read it); name "
                             "a file, e.g. sqlite:///studies/NAME.db")


def check_writable(url: str) -> None:
    """Refuse a SQLite study database the search could not write, before any work (SQLite
    also writes a journal beside the file: its folder must be writable too), and a new one
    inside a run, saved model, analysis or report (foreign there: its --force refuses it)."""
    from autobuild.files import output_holding

    path = sqlite_file(url)
    if path and not os.path.exists(path):
        holder = output_holding(os.path.dirname(os.path.abspath(path)), levels=1)
        if holder is not None:
            raise AutobuildError(f"study database {path!r} would be inside {holder[1]} "
                                 f"({holder[0]!r}), foreign to it; put it beside it (the "
                                 "default is studies/NAME.db)")
    if not path or not os.path.exists(path):
        return
    folder = os.path.dirname(os.path.abspath(path))
    for what, where in ((path, "the file"), (folder, "its folder, where SQLite writes its "
                                                   "journal,")):
        if not os.access(what, os.W_OK):
            raise AutobuildError(f"study database {path!r} cannot be written ({where} is "
                                 "read-only): a search records its trials there; status, "
                                 "report and export need only read it")


def open_storage(url: str, *, heartbeat: bool | tuple[int, int] | None = True,
                 create: bool = True) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage on ``url``, with heartbeats (``heartbeat``: True for the default
    interval and grace period, or (interval, grace) seconds; False/None for none, e.g. to
    read a study) and the retry of stale trials; one line naming the URL (password masked)
    when it cannot be opened. ``create=False`` (the commands that only read a study):
    a SQLite file that does not exist is refused, not created empty."""
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    quiet_optuna()
    check_url(url)
    path = sqlite_file(url)
    if path and not create and not os.path.isfile(path):
        raise AutobuildError(f"no study database {path!r} (check --storage / --study)")
    if path and os.path.isfile(path):
        _check_study_file(path, create)
    if path:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        except OSError as exc:
            raise AutobuildError(f"cannot create the folder of {url}: {exc.strerror}") from exc
    kwargs: dict[str, Any] = {}
    if heartbeat is None:
        heartbeat = True
    if heartbeat:
        interval, grace = (HEARTBEAT_S, GRACE_S) if heartbeat is True else heartbeat
        if not 1 <= interval < grace:
            raise AutobuildError(f"--heartbeat {interval} must be >= 1 and below --grace "
                                 f"{grace} (seconds; the defaults are {HEARTBEAT_S} and "
                                 f"{GRACE_S}: a shorter --grace needs a shorter --heartbeat)")
        kwargs = {"heartbeat_interval": interval, "grace_period": grace,
                  "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback()}
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {
        "pool_pre_ping": True}
    try:
        return _with_retries(lambda: RDBStorage(url, engine_kwargs=engine, **kwargs))
    except ModuleNotFoundError as exc:
        raise AutobuildError(f"storage {mask_url(url)} needs the driver {exc.name!r}: pip "
                             "install 'autobuild[search]' (psycopg for postgresql+psycopg)"
                             ) from exc
    except Exception as exc:  # sqlalchemy/psycopg: unreachable host, bad password, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AutobuildError(f"cannot open storage {mask_url(url)}: {first}") from exc


def _with_retries(make: Any, attempts: int = 6) -> Any:
    """Workers started at the same instant on a fresh database all create Optuna's tables;
    the losers of that race get a duplicate-key error: they retry, and find the tables."""
    import random

    for attempt in range(attempts):
        try:
            return make()
        except Exception as exc:
            racing = "duplicate key" in str(exc) or "already exists" in str(exc)
            if not racing or attempt == attempts - 1:
                raise
            time.sleep(0.2 + random.random())
    raise AssertionError("unreachable")


def holds_no_study(path: str) -> bool:
    """Whether the SQLite file ``path`` holds no study (Optuna's tables only, or nothing):
    a refused command that created it may remove it."""
    import sqlite3
    import urllib.parse

    try:
        uri = f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
            tables = {row[0] for row in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not tables:
                return True
            if "studies" not in tables:
                return False  # someone else's database: never ours to remove
            return db.execute("SELECT COUNT(*) FROM studies").fetchone()[0] == 0
    except sqlite3.Error:
        return False


def load_study(name: str, storage: optuna.storages.BaseStorage, url: str) -> optuna.Study:
    names = optuna.study.get_all_study_names(storage)
    if name not in names:
        shown = ", ".join(sorted(names)) or "(none)"
        raise AutobuildError(f"no study named {name!r} in {mask_url(url)}; studies there: "
                             f"{shown}")
    return optuna.load_study(study_name=name, storage=storage)


def live_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Running trials whose worker is alive (its heartbeat is recent, and on this machine
    its process exists)."""
    storage = study._storage
    stale = set()
    if getattr(storage, "get_heartbeat_interval", lambda: None)() is not None:
        stale = set(storage._get_stale_trial_ids(study._study_id))
    return [t for t in study.get_trials(deepcopy=False,
                                         states=(optuna.trial.TrialState.RUNNING,))
            if t._trial_id not in stale and not _died_here(study, t)]


def _died_here(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
    """Whether the trial's worker ran on this machine and its process is gone (killed):
    no need to wait out the grace period to know it will not finish. Asked of SQLite
    studies only, whose workers share one machine: two machines of one host name working
    on a PostgreSQL study must not take each other's processes for dead."""
    import socket

    storage = study._storage
    if not str(getattr(getattr(storage, "_backend", storage), "url", "")).startswith("sqlite"):
        return False
    host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    # Containers that share a host name (host networking) have PID namespaces of their
    # own: a process id is only looked up in the namespace it belongs to.
    if trial.user_attrs.get(PID_NAMESPACE_KEY, "") != pid_namespace():
        return False
    # A retried trial starts with its dead predecessor's attributes (Optuna's retry copies
    # them) until its worker names itself, milliseconds later: until then it is not judged.
    before = trial.system_attrs.get("failed_trial")
    if before is not None:
        predecessor = study.get_trials(deepcopy=False)[before]
        if predecessor.user_attrs.get("worker") == trial.user_attrs.get("worker"):
            return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # (alive, another user's)
        return False
    return False


#: The trial attribute naming its worker's PID namespace (see :func:`pid_namespace`).
PID_NAMESPACE_KEY = "worker_pid_namespace"


def pid_namespace() -> str:
    """This process's PID namespace ("" where the system does not tell)."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def fail_dead_trials(study: optuna.Study) -> None:
    """Fail the running trials whose worker is dead, and re-queue them with the same
    parameters (the heartbeat's retry callback): those silent for the grace period
    (Optuna's ``fail_stale_trials``), and at once those of a worker process on this machine
    that no longer exists (a ``kill -9``)."""
    from optuna.storages import fail_stale_trials

    fail_stale_trials(study)
    storage = study._storage
    retry = getattr(storage, "get_heartbeat_stale_trial_callback", lambda: None)()
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if not _died_here(study, trial):
            continue
        try:
            failed = storage.set_trial_state_values(trial._trial_id,
                                                    state=optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # (another process got there first)
        if failed and retry is not None:
            retry(study, storage.get_trial(trial._trial_id))


def finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=DONE))


def running_elsewhere(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))


def wait_for_others(study: optuna.Study, poll_s: float = 2.0) -> None:
    """Sleep a little while other workers' trials run, failing (and so re-queueing) any
    whose worker stopped sending heartbeats."""
    time.sleep(poll_s)
    fail_dead_trials(study)
