"""One trial of a placement search: sample a placement, cost it, refuse it if it breaks a
constraint, reuse an identical placement's result, else train it (stopping it early when
other trials dominate it) and record everything on the trial."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch

from autobuild.rewrite import Analysis, Choice, Placement, Region
from autobuild.search.groups import ResolvedGroup, resolve_groups
from autobuild.search.pruning import Curve, should_stop
from autobuild.search.space import OBJECTIVES, SearchSpace
from autobuild.search.study import PID_NAMESPACE_KEY, pid_namespace

__all__ = ["Objective", "SurplusTrial"]

#: Trial user attributes every trial gets (the report and the dashboard read them).
ATTR_KEY = "placement_key"
REUSE_POLL_S = 2.0
#: A running trial names its placement key a moment after it starts; one older than this
#: without a key never will (its worker died before), so nobody waits for it.
KEYLESS_WAIT_S = 60.0


class SurplusTrial(Exception):
    """Two workers started the study's last trial at once: the later one stands down
    (recorded FAIL with ``surplus``; it counts for nothing) so the study ends with exactly
    ``n_trials`` finished trials."""


def _device_name(setting: str) -> str:
    """Where this worker's trials train (``auto`` resolved), with the GPU's model and the
    ``CUDA_VISIBLE_DEVICES`` a worker was given: ``cuda:0 (NVIDIA H200,
    CUDA_VISIBLE_DEVICES=3)``."""
    from autobuild.train.devices import resolve_device

    device = resolve_device(setting)
    if device.type != "cuda":
        return str(device)
    details = [torch.cuda.get_device_name(device)]
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        details.append(f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']}")
    return f"{device} ({', '.join(details)})"


def _set_constraints(trial: optuna.Trial, values: dict[str, float]) -> None:
    """Set the constraints the trial does not hold yet: a trial Optuna retried after its
    worker went silent carries its predecessor's (Optuna warns on setting one again)."""
    held = trial.constraints
    for text, value in values.items():
        if text not in held:
            trial.set_constraint(text, value)


@dataclass
class _Sampled:
    placement: Placement
    regions: list[Region] = field(default_factory=list)


class Objective:
    """The callable ``study.optimize`` runs: see the module docstring."""

    def __init__(self, space: SearchSpace, analysis: Analysis, data: Any, config: Any, *,
                 artifact_store: Any = None, quiet: bool = False,
                 weights_dir: str | None = None, new_study: bool = True) -> None:
        self.space, self.analysis, self.data, self.config = space, analysis, data, config
        self.groups = resolve_groups(space, analysis, new=new_study)
        self.constraints = space.parsed_constraints()
        self.artifact_store = artifact_store
        self.quiet = quiet
        self.weights_dir = weights_dir
        self.baseline = {"params": analysis.counts.params, "macs": analysis.counts.macs,
                         "flops": analysis.counts.flops}
        self.needs_latency = "latency_ms" in space.objectives or any(
            c.metric == "latency_ms" for c in self.constraints)
        if self.needs_latency:
            self.baseline["latency_ms"] = _latency_ms(analysis.baseline.module,
                                                      analysis.baseline.input_size,
                                                      config.device)
        #: Set after each trial that trained: the trained model (seeding uses it for RI).
        #: The number of the trial running now (an interrupt re-queues it).
        self.current: int | None = None
        #: trial number -> when this worker first saw it running without a placement key
        self.keyless_seen: dict[int, float] = {}
        #: The study's target of finished trials (set by the worker loop) and whether the
        #: last trial stood down because it was beyond it.
        self.n_trials: int | None = None
        self.surplus = False
        import socket

        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.pid_namespace = pid_namespace()
        self.device_name = _device_name(str(config.device))

    # ---- the placement a trial proposes ---------------------------------------------
    def placement(self, trial: optuna.Trial) -> Placement:
        """Decide the groups in order (define-by-run); a site that overlaps a conversion
        an earlier group made is not asked about (it is part of that conversion)."""
        chosen: dict[str, Choice] = {}
        regions: list[Region] = []
        for group in self.groups:
            if group.per_site:
                for site in group.sites:
                    free = self._takers(group, [site], regions)
                    if free:
                        label = trial.suggest_categorical(f"site:{site}", group.labels)
                        self._apply(group, label, free, chosen, regions)
            else:
                free = self._takers(group, group.sites, regions)
                if free:
                    label = trial.suggest_categorical(group.name, group.labels)
                    self._apply(group, label, free, chosen, regions)
        return Placement(chosen)

    def _takers(self, group: ResolvedGroup, sites: list[str], regions: list[Region]
                ) -> list[str]:
        """The sites of ``sites`` some choice can take and no earlier conversion covers."""
        out = []
        for name in sites:
            region = self.analysis.region(name)
            if not any(region.overlaps(r) for r in regions) and any(
                    c is not None and group.offers(label, name) and self._can_take(c, name)
                    for label, c in zip(group.labels, group.choices, strict=True)):
                out.append(name)
        return out

    def _can_take(self, choice: Choice, site: str) -> bool:
        from autobuild.rewrite import get_family

        variant, s = get_family(choice.family), self.analysis.site(site)
        return variant.accepts(s, choice.opts) and not variant.refusal(s, choice.opts,
                                                                          self.analysis)

    def _apply(self, group: ResolvedGroup, label: str, sites: list[str],
               chosen: dict[str, Choice], regions: list[Region]) -> None:
        choice = group.choices[group.labels.index(label)]
        if choice is None:
            return
        from autobuild.rewrite import get_family

        variant = get_family(choice.family)
        for name in sites:
            if not group.offers(label, name) or not self._can_take(choice, name):
                continue
            region = variant.region(self.analysis.site(name), choice.opts, self.analysis)
            if any(region.overlaps(r) for r in regions):
                continue  # e.g. a block nested in another block of the same group
            chosen[name] = choice
            regions.append(region)

    # ---- one trial ------------------------------------------------------------------
    def __call__(self, trial: optuna.Trial) -> tuple[float, ...]:
        self.current = trial.number
        self.surplus = False
        trial.set_user_attr("worker", self.worker)
        trial.set_user_attr(PID_NAMESPACE_KEY, self.pid_namespace)
        self._claim(trial)
        start = time.perf_counter()
        placement = self.placement(trial)
        trial.set_user_attr(ATTR_KEY, placement.key)
        trial.set_user_attr("placement", placement.describe())
        trial.set_user_attr("placement_json", json.dumps(
            {s: str(c) for s, c in placement.items()}))
        trial.set_user_attr("seed", self.space.seed)
        trial.set_user_attr("device", self.device_name)
        self.analysis.check(placement, self.space.init)
        costs = self.analysis.cost(placement).to_dict()
        for key in ("params", "macs", "flops"):
            trial.set_user_attr(key, costs[key])
        reused = self._reuse(trial, placement.key)
        if reused is not None:  # (its own wall time: the waiting, not the source's training)
            trial.set_user_attr("wall_time_s", time.perf_counter() - start)
            return reused
        model = None
        if self.needs_latency:
            model = self._build(placement)
            costs["latency_ms"] = _latency_ms(model, self.analysis.baseline.input_size,
                                              self.config.device)
            trial.set_user_attr("latency_ms", costs["latency_ms"])
        violations = {c.text: c.violation(costs, self.baseline) for c in self.constraints}
        _set_constraints(trial, violations)
        trial.set_user_attr("constraints", violations)
        feasible = all(v <= 0 for v in violations.values())
        trial.set_user_attr("feasible", feasible)
        self._upload_plan(trial, placement)
        if not feasible:
            trial.set_user_attr("trained", False)
            self.say(f"trial {trial.number}: {placement.describe()} is over a constraint "
                      f"({', '.join(t for t, v in violations.items() if v > 0)}): not trained")
            if trial.user_attrs.get("seed_kind") == "all_converted" and \
                    self.space.seeding.revert_top_ri:  # (RI is measured on it trained)
                reason = "the all-converted network is over a constraint: no RI to measure"
                trial.set_user_attr("ri_error", reason)
                self.say(f"trial {trial.number}: no RI seeds, {reason}")
            # Never trained: top-1 0 (Optuna ranks it below every feasible trial anyway).
            return self._values({**costs, "top1": 0.0})
        if model is None:
            model = self._build(placement)
        try:
            top1 = self._train(trial, model, placement, costs)
        except optuna.TrialPruned:  # (trained, for the epochs it had)
            trial.set_user_attr("trained", True)
            trial.set_user_attr("wall_time_s", time.perf_counter() - start)
            raise
        trial.set_user_attr("trained", True)
        trial.set_user_attr("wall_time_s", time.perf_counter() - start)
        if self.space.keep_weights:
            self._upload_weights(trial, model)
        self._seed_reverts(trial, model)  # (when training ended before importance_epochs)
        return self._values({**costs, "top1": top1})

    def _seed_reverts(self, trial: optuna.Trial, model: torch.nn.Module) -> None:
        from autobuild.search.seeding import seed_reverts

        seed_reverts(trial, model, self)

    def _build(self, placement: Placement) -> torch.nn.Module:
        """The placement's network, from the same initial weights whatever ran before it in
        this process (as `autobuild train` seeds before it builds): a single-worker search
        is then reproducible, and a placement's score does not depend on the trial order."""
        return self.analysis.build(placement, self.space.init, seed=self.space.seed)

    def _claim(self, trial: optuna.Trial) -> None:
        """Stand down if this trial is beyond the study's ``n_trials``: trials that finished
        or run now are ranked by number (the storage hands numbers out atomically), and only
        the first ``n_trials`` may run."""
        if self.n_trials is None:
            return
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                  optuna.trial.TrialState.RUNNING)
        live = sorted(t.number for t in trial.study.get_trials(deepcopy=False, states=states))
        if trial.number in live and live.index(trial.number) >= self.n_trials:
            self.surplus = True
            trial.set_user_attr("surplus", True)
            raise SurplusTrial(f"trial {trial.number} is beyond the study's {self.n_trials}")

    def _values(self, metrics: dict[str, float]) -> tuple[float, ...]:
        return tuple(float(metrics[name]) for name in self.space.objectives)

    # ---- training with early stopping ----------------------------------------------------
    def _train(self, trial: optuna.Trial, model: torch.nn.Module, placement: Placement,
               costs: dict[str, float]) -> float:
        from autobuild.train import DivergedError, train

        history: list[float] = []
        cost_keys = [o for o in self.space.objectives if OBJECTIVES[o] == "minimize"]
        mine = Curve(history, [costs[k] for k in cost_keys])
        single = len(self.space.objectives) == 1
        pruned = {"stop": False}

        def on_epoch(metrics: Any) -> bool:
            history.append(float(metrics.val_top1))
            trial.set_user_attr("top1_per_epoch", list(history))
            self.say(f"trial {trial.number}: {placement.describe()} epoch {metrics.epoch}/"
                      f"{self.config.epochs} top-1 {metrics.val_top1:.2f}% "
                      f"MACs {costs['macs'] / 1e6:.1f}M")
            if single:
                trial.report(metrics.val_top1, metrics.epoch)
                pruned["stop"] = trial.should_prune()
            else:
                others = _curves(trial, cost_keys)
                pruned["stop"] = should_stop(mine, others, metrics.epoch, self.space.pruning)
            # RI after seeding.importance_epochs (or when pruned before): the reverts are
            # queued for other workers while this trial trains on.
            if metrics.epoch >= self.space.seeding.importance_epochs or pruned["stop"]:
                self._seed_reverts(trial, model)
            return not pruned["stop"]

        try:
            # (the recipe was checked when the study was created: an older study goes on)
            result = train(model, self.data, self.config, callback=on_epoch,
                           check_recipe=False)
        except DivergedError as exc:
            trial.set_user_attr("fail_reason", str(exc))
            self.say(f"trial {trial.number}: {placement.describe()} failed: {exc}")
            raise
        trial.set_user_attr("best_epoch", result.best_epoch)
        trial.set_user_attr("train_s", result.seconds)
        if pruned["stop"] and result.stopped_early:
            trial.set_user_attr("pruned_at_epoch", len(history))
            raise optuna.TrialPruned(f"dominated at epoch {len(history)}")
        return float(result.best_top1)

    # ---- identical placements ---------------------------------------------------------
    def _reuse(self, trial: optuna.Trial, key: str) -> tuple[float, ...] | None:
        """The values of an earlier trial with the same placement (waiting for one that is
        running now, whoever runs it); None when this trial must train."""
        study = trial.study
        while True:
            same = [t for t in study.get_trials(deepcopy=False)
                    if t.number != trial.number and t.user_attrs.get(ATTR_KEY) == key]
            done = [t for t in same if t.state == optuna.trial.TrialState.COMPLETE]
            if done:
                source = min(done, key=lambda t: t.number)
                for name, value in source.user_attrs.items():
                    # the result, not why the source was enqueued (a seed's kind)
                    if name not in trial.user_attrs and name not in (
                            "reused_from", "seed_kind", "ri_error", "wall_time_s",
                            "requeued_from"):
                        trial.set_user_attr(name, value)
                _set_constraints(trial, source.constraints)
                trial.set_user_attr("reused_from", source.number)
                self.say(f"trial {trial.number}: same placement as trial {source.number}: "
                          "its result is reused")
                return tuple(source.values)
            running = [t for t in same if t.state == optuna.trial.TrialState.RUNNING
                       and t.number < trial.number]
            if running:
                time.sleep(REUSE_POLL_S)
            elif _keyless_before(study, trial.number, self.keyless_seen):
                # An earlier trial has not named its placement yet. Deciding now would race
                # it: it may be this placement and, seeing this trial's higher number, train
                # it too. The lower number trains; a later one waits for it.
                time.sleep(REUSE_POLL_S / 10)
            else:
                return None

    # ---- records ----------------------------------------------------------------------
    def _upload_plan(self, trial: optuna.Trial, placement: Placement) -> None:
        if self.artifact_store is None:
            return
        from optuna.artifacts import upload_artifact

        from autobuild.io import save_plan

        plan = self.analysis.plan(placement, self.space.init)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "plan.yaml")
            save_plan(plan, path)
            trial.set_user_attr("plan_artifact", upload_artifact(
                artifact_store=self.artifact_store, file_path=path, study_or_trial=trial))

    def _upload_weights(self, trial: optuna.Trial, model: torch.nn.Module) -> None:
        if self.artifact_store is None:
            return
        from optuna.artifacts import upload_artifact

        from autobuild.io import save_weights

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "weights.safetensors")
            save_weights(model, path)
            trial.set_user_attr("weights_artifact", upload_artifact(
                artifact_store=self.artifact_store, file_path=path, study_or_trial=trial))

    def say(self, line: str) -> None:
        if not self.quiet:
            print(line, file=sys.stderr, flush=True)


def _keyless_before(study: optuna.Study, number: int, first_seen: dict[int, float]) -> bool:
    """Whether a running trial numbered below ``number`` has not set its placement key yet
    and may still do so: ``first_seen`` (trial number -> monotonic time, kept by the worker
    across its trials) bounds the wait on each, without trusting other machines' clocks."""
    now = time.monotonic()
    keyless = [t.number for t in study.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        if t.number < number and ATTR_KEY not in t.user_attrs]
    return any(now - first_seen.setdefault(n, now) < KEYLESS_WAIT_S for n in keyless)


def _curves(trial: optuna.Trial, cost_keys: list[str]) -> list[Curve]:
    """The learning curves of the study's other trials that trained."""
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    out = []
    for t in trial.study.get_trials(deepcopy=False, states=done):
        curve = t.user_attrs.get("top1_per_epoch")
        if curve and t.number != trial.number and all(k in t.user_attrs for k in cost_keys):
            out.append(Curve(curve, [t.user_attrs[k] for k in cost_keys]))
    return out


@torch.no_grad()
def _latency_ms(model: torch.nn.Module, input_size: Any, device: str, repeats: int = 10
                ) -> float:
    """Median forward time of one image in eval mode on ``device`` (after warm-up)."""
    import copy
    import statistics

    from autobuild.train.loop import resolve_device

    dev = resolve_device(device)
    net = copy.deepcopy(model).to(dev).eval()
    x = torch.randn(1, *input_size, device=dev)
    for _ in range(3):
        net(x)
    times = []
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        net(x)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)
