"""Checks a search makes before it touches a study, and the undoing of what a refused
command created: a database file and an artifact directory that hold nothing."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

from autobuild.errors import AutobuildError
from autobuild.search.study import holds_no_study, sqlite_file

__all__ = ["another_space", "check_budget", "check_data_dir", "undone_on_refusal"]


def check_budget(space: Any, config: Any) -> None:
    """Regularisers the baseline cannot take (a drop path rate without DARTS cells, a
    tower weight without a tower), refused before the study is touched. The structure is
    built on the meta device (nothing is allocated), or for real by a builder that cannot
    build there (torchvision's RegNets initialise from data)."""
    if not config.drop_path and config.aux_weight is None:
        return
    from autobuild.models import resolve_baseline
    from autobuild.train.regularize import check_regularizers

    try:
        baseline = resolve_baseline(space.baseline, device="meta", model_args=space.model_args)
    except (NotImplementedError, RuntimeError):
        baseline = resolve_baseline(space.baseline, model_args=space.model_args)
    check_regularizers(baseline.module, config, key=space.key("budget."))


@contextlib.contextmanager
def undone_on_refusal(url: str, folder: str) -> Iterator[None]:
    """On any failure, remove what this command created and holds nothing: the SQLite file
    (when no study is in it) and the directories made for it or for the artifacts (when
    empty), ``--artifacts a/b/c``'s ``a`` and ``a/b`` included."""
    path = sqlite_file(url)
    new_file = bool(path) and not os.path.exists(path)
    new_dirs = _missing_dirs(os.path.dirname(os.path.abspath(path))) if path else []
    if not folder.startswith("s3://"):
        new_dirs += _missing_dirs(os.path.abspath(folder))
    try:
        yield
    except BaseException:
        if new_file and os.path.isfile(path) and holds_no_study(path):
            for leftover in (path, path + "-journal", path + "-wal", path + "-shm"):
                with contextlib.suppress(OSError):
                    os.remove(leftover)
        for directory in new_dirs:  # innermost first; rmdir removes only an empty one
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        raise


def _missing_dirs(path: str) -> list[str]:
    """``path`` and those of its parents that do not exist yet, innermost first."""
    missing = []
    while path and not os.path.exists(path) and path != os.path.dirname(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def check_new_space(space: Any) -> None:
    """What a new study's space may not hold, though a study made before this was refused
    continues with it: a group named "", a group with nothing to choose but ``keep`` (its
    choices were given empty) and one conversion listed twice in a group (the sampler would
    weigh it double)."""
    from autobuild.rewrite import Choice

    for i, group in enumerate(space.groups):
        if group.name is not None and not group.name.strip():
            raise AutobuildError(f"{space.key(f'groups.{i}.name')}: must not be empty")
        if len(group.choices) < 2:  # (keep is always there)
            raise AutobuildError(f"{space.key(f'groups.{i}.choices')}: nothing to choose "
                                 "besides keep; list at least one conversion (e.g. "
                                 "quadratic:ours) or remove the group")
        seen: dict[Any, str] = {}
        for text in group.choices:
            choice = Choice.parse(json.loads(text) if text.startswith("{") else text)
            if choice in seen:
                raise AutobuildError(f"{space.key(f'groups.{i}.choices')}: choices "
                                     f"{seen[choice]!r} and {text!r} are the same conversion; "
                                     "list each once")
            seen[choice] = text


def check_data_dir(space: Any) -> None:
    """A new study's ``data_dir`` is where CIFAR's batches are: with other data it would be
    ignored (as ``train --data-dir`` refuses it)."""
    if space.data_dir and space.data.partition(":")[0] not in ("cifar10", "cifar100"):
        raise AutobuildError(f"{space.key('data_dir')} {space.data_dir!r}: it is where CIFAR's "
                             f"batches are; data {space.data!r} does not read it")


def another_space(study: Any, space: Any, name: str, flag: str, fingerprint: str | None
                  ) -> str:
    """Why ``flag`` is refused: the keys where the study's space and this one differ, and
    the ``--set`` flags that give the study's values (a study made with ``--set`` is
    continued with the same ones)."""
    from autobuild.search.space import UNSET, set_flag

    stored = study.user_attrs.get("space")
    diffs = space.differences(stored) if isinstance(stored, dict) else []
    if not diffs:  # (a space an older version fingerprinted otherwise)
        return (f"study {name!r} was made from another search space (fingerprint "
                f"{fingerprint} vs {space.fingerprint()}); {flag} works on the same "
                "space only: use --study NEW")
    shown = "; ".join(f"{k} is {there!r} there, {here!r} here" for k, there, here in diffs[:3])
    more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
    fixes = [f"remove {k} from the space file" if there is UNSET else set_flag(k, there)
             for k, there, _ in diffs]
    return (f"study {name!r} was made from another search space: {shown}{more}; {flag} "
            f"continues a study with the space it was made from: give the values it was "
            f"made with ({', '.join(fixes)}) or start another with --study NEW")
