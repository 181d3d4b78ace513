"""The multi-objective early-stopping rule."""

from __future__ import annotations

from autobuild.search.pruning import Curve, dominators_at, should_stop
from autobuild.search.space import Pruning


def test_a_clearly_weak_trial_is_stopped_and_a_cheap_one_is_not() -> None:
    rule = Pruning(warmup_epochs=1, min_dominators=2)
    others = [Curve([40, 60, 70], [100]), Curve([35, 55, 65], [90]), Curve([50, 70], [300])]
    weak = Curve([20, 25], [100])
    assert dominators_at(weak, others, 2) == 2  # the 300-MAC trial costs more: not counted
    assert should_stop(weak, others, 2, rule)
    assert not should_stop(weak, others, 1, rule)  # warm-up
    cheap = Curve([20, 25], [10])  # worse accuracy, far cheaper: nobody dominates it
    assert dominators_at(cheap, others, 2) == 0 and not should_stop(cheap, others, 2, rule)
    strong = Curve([45, 65], [100])
    assert not should_stop(strong, others, 2, rule)
    assert not should_stop(weak, others, 2, Pruning(enabled=False))
    assert not should_stop(weak, others, 2, Pruning(margin=40.0))  # within the slack
