"""optuna-dashboard on a study's storage and artifact directory, on 127.0.0.1."""

from __future__ import annotations

import glob
import os
import socket
import sys

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
    """Start optuna-dashboard (blocks until interrupted) and print its URL first."""
    from optuna.artifacts import FileSystemArtifactStore
    from optuna_dashboard import run_server

    if port is not None and not 1 <= port <= 65535:
        raise AutobuildError(f"--port must be in 1..65535, got {port}")
    store = open_storage(storage, heartbeat=False, create=False)
    folder = artifact_dir(storage, study or "", artifacts)
    artifact_store = FileSystemArtifactStore(folder) if os.path.isdir(folder) else None
    port = port or free_port()
    print(f"optuna-dashboard for {mask_url(storage)} (artifacts: "
          f"{folder if artifact_store else 'none'})\n  http://127.0.0.1:{port}/dashboard\n"
          "  (Ctrl-C stops it)", flush=True)
    try:
        run_server(store, host="127.0.0.1", port=port, artifact_store=artifact_store)
    except OSError as exc:
        print(f"autobuild: error: cannot serve on 127.0.0.1:{port}: {exc.strerror}",
              file=sys.stderr)
        raise AutobuildError(f"port {port} is not free: pass another --port") from exc
