"""optuna-dashboard on a study's storage and artifact directory, on 127.0.0.1."""

from __future__ import annotations

import glob
import os
import socket
from typing import Any

from autobuild.errors import AutobuildError
from autobuild.search.study import artifact_dir, mask_url, open_storage

__all__ = ["free_port", "resolve_storage", "serve"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def resolve_storage(storage: str | None, study: str | None) -> str:
    """``storage``, else the study's default SQLite file, else the only one in studies/."""
    if storage:
        return storage
    if study:
        from autobuild.search.study import default_storage

        url = default_storage(study)
        if not os.path.exists(url[len("sqlite:///"):]):
            raise AutobuildError(f"no study database {url[len('sqlite:///'):]!r}; pass "
                                 "--storage URL")
        return url
    found = sorted(glob.glob(os.path.join("studies", "*.db")))
    if len(found) != 1:
        shown = ", ".join(found) or "none"
        raise AutobuildError(f"pass --storage URL or --study NAME (databases in studies/: "
                             f"{shown})")
    return f"sqlite:///{os.path.abspath(found[0])}"


def serve(storage: str, *, study: str | None = None, port: int | None = None,
          artifacts: str | None = None) -> None:
    """Start optuna-dashboard and print its URL first; it serves until interrupted, and
    then raises KeyboardInterrupt (the server itself swallows it). Every argument is
    checked before the server starts: the port is free, ``artifacts`` is a directory,
    ``study`` is in the storage."""
    from optuna_dashboard import run_server

    from autobuild.search.study import load_study

    if port is not None:
        _check_port(port)
    artifact_store = _artifacts(storage, study, artifacts)
    store = open_storage(storage, heartbeat=False, create=False)
    if study:
        load_study(study, store, storage)  # an unknown name lists the studies there
    port = port or free_port()
    folder = artifact_dir(storage, study or "", artifacts)
    print(f"optuna-dashboard for {mask_url(storage)} (artifacts: "
          f"{folder if artifact_store else 'none'})\n  http://127.0.0.1:{port}/dashboard\n"
          "  (Ctrl-C stops it)", flush=True)
    try:
        run_server(store, host="127.0.0.1", port=port, artifact_store=artifact_store)
    except OSError as exc:  # taken between the check and the start
        raise AutobuildError(f"--port {port}: cannot serve on 127.0.0.1:{port} "
                             f"({exc.strerror}); pass another --port") from exc
    # The server returns only when interrupted (Bottle catches the KeyboardInterrupt of a
    # Ctrl-C): the command exits 130 as every interrupted one does (SIGTERM: 143).
    raise KeyboardInterrupt


def _check_port(port: int) -> None:
    """Refuse a port that is taken before the server prints anything (Bottle would print
    its banner, then fail)."""
    if not 1 <= port <= 65535:
        raise AutobuildError(f"--port must be in 1..65535, got {port}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            raise AutobuildError(f"--port {port}: 127.0.0.1:{port} is not free "
                                 f"({exc.strerror}); pass another --port, or none for a free "
                                 "one") from None


def _artifacts(storage: str, study: str | None, given: str | None) -> Any:
    """The artifact store to serve: ``given`` (which must exist), else the default folder
    beside the storage when there is one, else none."""
    from optuna.artifacts import FileSystemArtifactStore

    folder = artifact_dir(storage, study or "", given)
    if given and folder.startswith("s3://"):
        from autobuild.search.runner import artifact_store

        return artifact_store(folder)
    if given and not os.path.isdir(folder):
        what = "is not a directory" if os.path.exists(folder) else "does not exist"
        raise AutobuildError(f"--artifacts {given!r} {what}; give the study's artifact "
                             "directory (as passed to `search --artifacts`)")
    return FileSystemArtifactStore(folder) if os.path.isdir(folder) else None
