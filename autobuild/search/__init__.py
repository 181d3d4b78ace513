"""The auto-builder: RI importance and the Optuna placement search, its reports and the
dashboard. Uses the engine (``autobuild.rewrite``) and training (``autobuild.train``)."""

from autobuild.search.importance import importance
from autobuild.search.report import hypervolume, trials_frame, write_report
from autobuild.search.runner import Search, prepare, run
from autobuild.search.space import SearchSpace, load_space

__all__ = ["Search", "SearchSpace", "hypervolume", "importance", "load_space", "prepare", "run",
           "trials_frame", "write_report"]
