"""Atomic writes for the whole project: files and directories.

Every file is written to a temporary name in its own directory, flushed, fsynced and renamed
over the destination, so a reader sees the old file or the new one, never half of one. A
directory (a saved model, a run's final files) is written into a staging directory that is
then swapped with the destination in one step, so the destination holds the complete old
content or the complete new one at every instant.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

import torch

from autobuild.errors import AutobuildError

__all__ = ["OUTPUT_FILES", "OUTPUT_KINDS", "atomic_copy", "atomic_file", "atomic_torch_save",
           "atomic_write_text", "check_replaceable", "ensure_writable_dir", "output_holding",
           "output_kind", "staged_directory"]

_TMP = ".tmp-"
#: Test hook: called with a step name at each step of :func:`staged_directory` and of
#: ``autobuild.io.save`` (fault injection).
_fault_hook: Callable[[str], None] | None = None


def _step(name: str) -> None:
    if _fault_hook is not None:
        _fault_hook(name)


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temp_name(path: str) -> str:
    directory, base = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{base}{_TMP}{os.getpid()}-{os.urandom(4).hex()}")


def _umask() -> int:
    try:  # read, not set: os.umask() would change it for every thread for a moment
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
        return umask


def _file_mode() -> int:
    """The mode a plain ``open()`` gives a new file (0o666 less the umask). Libraries that
    write through a temporary file of their own (safetensors: 0o600) are brought to it."""
    return 0o666 & ~_umask()


def _writable(path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(directory):
        raise AutobuildError(f"cannot write {path!r}: {directory!r} is not a directory")


@contextlib.contextmanager
def _replacing(path: str) -> Iterator[str]:
    """A temporary name beside ``path`` for the caller to write; on success the file is
    fsynced, given ``open()``'s mode and renamed over ``path`` (then the directory is
    fsynced); on any failure it is removed and ``path`` is untouched."""
    _writable(path)
    tmp = _temp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise AutobuildError(f"cannot write {path!r}: {exc.strerror or exc}") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w") -> Iterator[IO[Any]]:
    """Write ``path`` atomically: yields a file object on a temporary name in the same
    directory; on success it is flushed, fsynced and renamed over ``path``."""
    with _replacing(path) as tmp, open(tmp, mode) as f:
        yield f


def atomic_write_text(path: str, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def _atomic_by_name(path: str, write: Callable[[str], None]) -> None:
    """Atomic write for libraries that take a file name (safetensors, torch.save)."""
    with _replacing(path) as tmp:
        write(tmp)


def atomic_copy(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst`` atomically."""
    _atomic_by_name(dst, lambda tmp: shutil.copyfile(src, tmp))


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` atomically."""
    _atomic_by_name(path, lambda tmp: torch.save(obj, tmp))


# ---- directories ---------------------------------------------------------------------------
#: The kinds of output directory autobuild writes, by the names that mark each (tested in
#: this order: a run also holds a model's files).
OUTPUT_KINDS = {
    "run": ("a training run", frozenset({"train.yaml", "checkpoint.pt", "metrics.csv",
                                         "last.safetensors"})),
    "report": ("a search report", frozenset({"report.md", "trials.csv", "pareto.png",
                                             "ri.csv"})),
    "analysis": ("an analysis", frozenset({
        "layers.csv", "sites.csv", "weights.csv", "histograms.csv", "compare.csv",
        "activations.png", "gradients.png", "activation_histograms.png",
        "weight_histograms.png", "weights.png", "compare.png", "compare"})),
    "model": ("a saved model", frozenset({"plan.yaml", "weights.safetensors",
                                          "init.safetensors"})),
}
#: Every name autobuild writes in an output directory: --force replaces a directory whole,
#: so only one that holds nothing else. A folder of datasets or of study databases given as
#: --out by mistake, or a run beside which the user keeps notes, is refused, not emptied.
OUTPUT_FILES = frozenset().union(*(names for _, names in OUTPUT_KINDS.values()))


def output_kind(entries: Iterable[str]) -> str | None:
    """Which of :data:`OUTPUT_KINDS` a directory holding ``entries`` is (None: none)."""
    entries = set(entries)
    return next((kind for kind, (_, names) in OUTPUT_KINDS.items() if entries & names), None)


#: What marks a directory as an output autobuild wrote, by kind: files no other tool writes
#: together (a lone ``ri.csv`` or ``plan.yaml`` is as likely the user's own).
_MARKERS = {"run": ({"train.yaml"}, {"checkpoint.pt"}),
            "model": ({"plan.yaml", "weights.safetensors"},),
            "report": ({"report.md", "trials.csv"},),
            "analysis": ({"layers.csv", "sites.csv"},)}


def output_holding(path: str, levels: int = 2) -> tuple[str, str] | None:
    """(directory, what it is) when ``path`` or one of its ``levels - 1`` nearest parents is
    an autobuild output directory (a run, a saved model, an analysis, a report: by
    :data:`_MARKERS`): a file written there is foreign to it (its ``--force`` then refuses
    it, or deletes it)."""
    probe = os.path.abspath(path)
    for _ in range(levels):
        if os.path.isdir(probe):
            with contextlib.suppress(OSError):
                entries = set(os.listdir(probe))
                kind = next((k for k, sets in _MARKERS.items()
                             if any(s <= entries for s in sets)), None)
                if kind is not None:
                    return probe, OUTPUT_KINDS[kind][0]
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    return None


def _foreign(path: str, entries: list[str]) -> list[str]:
    """What ``path`` holds that autobuild did not write. A hidden file (.DS_Store) is no
    loss; a hidden folder (.git) is."""
    return sorted(e for e in entries if e not in OUTPUT_FILES and not (
        e.startswith(".") and not os.path.isdir(os.path.join(path, e))))


def ensure_writable_dir(path: str, *, force: bool = False, keep: Iterable[str] = (),
                        writes: str | None = None) -> None:
    """Refuse a non-empty ``path`` unless ``force`` (nothing is lost silently), and with
    ``force`` one that is or holds what the command reads (``keep``, see
    :func:`check_replaceable`), that holds anything autobuild did not write, or that holds
    another kind of output than the one the command ``writes`` (a key of
    :data:`OUTPUT_KINDS`: a saved model written over a training run would lose the run);
    refuse a file or a directory that cannot be written. Creates nothing."""
    if not isinstance(path, str) or not path.strip():
        raise AutobuildError(f"an output directory must be a non-empty path, got {path!r}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise AutobuildError(f"{path!r} exists and is not a directory; choose another --out")
    entries = _entries(path) if os.path.isdir(path) else []
    if entries and not force:
        # (spelled as the CLI does, as every error: README, "Errors spell settings")
        raise AutobuildError(f"{path!r} is not empty; choose another --out or pass --force "
                             "to overwrite it")
    if entries:
        check_replaceable(path, keep)
    foreign = _foreign(path, entries)
    shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
    if foreign and not set(entries) & OUTPUT_FILES:
        raise AutobuildError(f"{path!r} holds nothing autobuild wrote ({shown}): --force "
                             "replaces a run, a saved model, an analysis or a report, never "
                             "other files; choose another --out")
    if foreign:
        raise AutobuildError(f"{path!r} also holds what autobuild did not write ({shown}): "
                             "--force replaces the directory whole and would delete "
                             f"{'them' if len(foreign) > 1 else 'it'}; move "
                             f"{'them' if len(foreign) > 1 else 'it'} out, or choose another "
                             "--out")
    found = output_kind(entries)
    if force and writes and found and found != writes:
        raise AutobuildError(f"{path!r} is {OUTPUT_KINDS[found][0]}, and this writes "
                             f"{OUTPUT_KINDS[writes][0]}: --force replaces an output with one "
                             f"of its kind only ({OUTPUT_KINDS[found][0]} would be lost); "
                             "choose another --out")
    parent = os.path.dirname(os.path.abspath(path))
    holder = output_holding(parent, levels=1)
    if holder is not None:
        raise AutobuildError(f"{path!r} would be inside {holder[1]} ({holder[0]!r}), foreign "
                             "to it (its --force would refuse or delete it); choose an --out "
                             "beside it")
    probe = path if os.path.isdir(path) else _existing_ancestor(parent)
    if not os.path.isdir(probe):  # (os.access says a file is writable: it is no folder)
        raise AutobuildError(f"cannot write to {path!r}: {probe!r} is a file, not a "
                             "directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise AutobuildError(f"cannot write to {path!r}: {probe!r} is not writable")


def _existing_ancestor(path: str) -> str:
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _entries(path: str) -> list[str]:
    return [e for e in os.listdir(path) if _TMP not in e]


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _clean_stale(dest: str) -> None:
    """Remove staging/backup directories a killed save left beside ``dest``."""
    directory, base = os.path.split(os.path.abspath(dest))
    for stale in glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(base)}{_TMP}*")):
        shutil.rmtree(stale, ignore_errors=True)


def check_replaceable(dest: str, keep: Iterable[str] = ()) -> None:
    """Replacing ``dest`` whole (``--force``) deletes all it holds: refuse a ``dest`` that is
    or holds the working directory or any of ``keep`` (the run being analysed, a study's
    database). Creates nothing."""
    if not os.path.isdir(dest):
        return
    target = os.path.realpath(dest)
    guarded = [(os.getcwd(), "the current directory")]
    guarded += [(k, f"{k!r}, which this command must keep") for k in keep if k]
    for path, what in guarded:
        real = os.path.realpath(path)
        if real == target or real.startswith(target.rstrip(os.sep) + os.sep):
            how = "is" if real == target else "holds"
            raise AutobuildError(f"{dest!r} {how} {what}: replacing it whole (--force) would "
                                 "delete that; choose another --out")


@contextlib.contextmanager
def staged_directory(dest: str, *, force: bool = False, writes: str | None = None
                     ) -> Iterator[str]:
    """Yield a staging directory beside ``dest``; when the block succeeds it replaces
    ``dest`` in one step (the old content, if any, is removed afterwards). Refuses a
    non-empty ``dest`` unless ``force``."""
    ensure_writable_dir(dest, force=force, writes=writes)
    check_replaceable(dest)  # (an empty working directory, too: it would be swapped out)
    dest = os.path.abspath(dest)
    parent = os.path.dirname(dest)
    try:
        os.makedirs(parent, exist_ok=True)
        _clean_stale(dest)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}{_TMP}", dir=parent)
        os.chmod(staging, 0o777 & ~_umask())  # as os.mkdir would make it (mkdtemp: 0o700)
    except OSError as exc:
        raise AutobuildError(f"cannot write {dest!r}: {exc.strerror or exc}") from exc
    try:
        yield staging
        _step("staged")
        _fsync_dir(staging)
        if not os.path.exists(dest):
            os.rename(staging, dest)
        elif _exchange(staging, dest):
            _step("exchanged")
            shutil.rmtree(staging, ignore_errors=True)  # now holds the old content
        else:  # no atomic exchange: the old directory is parked, then removed
            backup = _temp_name(dest)
            os.rename(dest, backup)
            os.rename(staging, dest)
            shutil.rmtree(backup, ignore_errors=True)
        _fsync_dir(parent)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise AutobuildError(f"cannot write {dest!r}: {exc.strerror or exc}") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
