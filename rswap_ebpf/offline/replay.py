"""Replay a recorded trace through the daemon's pipeline, without root.

Each policy gets its own pool and :class:`~rswap_ebpf.swap.manager.SwapManager` (the daemon's),
and every tick runs the daemon's :class:`~rswap_ebpf.runtime.pipeline.Pipeline` (Observe ->
Forecast -> Allocate -> Enforce) on a trace-backed host (:class:`TraceDriver`): the allocation
decided at tick *t* is what the task has during tick *t + 1*, and is scored against the demand
recorded then.  The policies differ only in the Forecast stage.

* ``static``: equal shares of the pool, never changed (what a fixed quota gives).
* ``reactive``: last value + headroom (what a threshold autoscaler gives).
* ``vpa``: the 90th percentile of the last ``vpa_window`` samples + 15% (Kubernetes' VPA
  recommender, which uses a decaying histogram's P90 and a 15% safety margin).
* ``proactive``: the forecaster (default: online model selection on the pinball loss), its
  forecast for the next ``window`` ticks, peak taken, plus ``proactive_headroom``.

The trace's demand is what each task would have used had it been given enough (``rswap record``
caps nothing).  Replay enforces each policy's allocation the way the daemon's drivers do: a task
uses at most what it holds (never less than :data:`ENFORCED_FLOOR`, the least a cap lets
through), uncapped only before its first allocation, and what the policies learn from is
:meth:`SwapManager.observed_demand` of that capped use, with the kernel's "throttled" flag where
the real driver reports one (:data:`KERNEL_CENSORS`) -- the pipeline's Observe stage.  So a
policy that under-allocates also under-observes, as it would on a host.  Shortfall is what a
policy withheld from the recorded demand.
Figures per task x resource: MAE and MAPE of the 1-tick-ahead forecast (MAPE over ticks with
demand >= 1 unit), shortfall and slack in unit*seconds, allocation changes, and swaps (units moved
from a lower tier) the task took part in.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from rswap_ebpf.errors import ConfigError
from rswap_ebpf.host.cgroup import TaskCgroup
from rswap_ebpf.model.limits import Limits, Priority
from rswap_ebpf.model.resources import ResourcePool, ResourceType
from rswap_ebpf.model.stats import quantile
from rswap_ebpf.offline.host import (ENFORCED_FLOOR, KERNEL_CENSORS, KERNEL_READS,  # noqa: F401
                                     READINGS, TraceDriver, throttled_reading)
from rswap_ebpf.offline.trace import Trace
from rswap_ebpf.predict.profile import TaskProfiler
from rswap_ebpf.predict.registry import make_forecaster
from rswap_ebpf.runtime.pipeline import (Allocate, Enforce, Forecasts, Observation, Observe,
                                         Pipeline, ProfileForecast, SlotClock)
from rswap_ebpf.swap.manager import ManagedTask, SwapManager

POLICIES = ("static", "reactive", "vpa", "proactive")

@dataclass
class Score:
    policy: str
    task: str
    resource: ResourceType
    abs_err: float = 0.0
    pct_err: float = 0.0
    n_err: int = 0
    n_pct: int = 0
    shortfall: float = 0.0  # unit * s
    slack: float = 0.0      # unit * s
    changes: int = 0
    swaps: int = 0
    model: str = ""
    forecasts: bool = True

    @property
    def mae(self) -> float | None:
        return self.abs_err / self.n_err if self.forecasts and self.n_err else None

    @property
    def mape(self) -> float | None:
        return 100.0 * self.pct_err / self.n_pct if self.forecasts and self.n_pct else None


@dataclass
class ReplayResult:
    trace: Trace
    totals: dict[ResourceType, int]
    scores: list[Score] = field(default_factory=list)

    def by_policy(self, policy: str) -> list[Score]:
        return [s for s in self.scores if s.policy == policy]

    def total(self, policy: str, what: str, resource: ResourceType | None = None) -> float:
        """``what`` summed over ``policy``'s tasks of ``resource`` (one unit).  Without a
        resource the trace must have only one: a sum of millicores and IO/s means nothing."""
        if resource is None:
            units = {s.resource for s in self.by_policy(policy)}
            if len(units) > 1:
                raise ValueError(f"{policy}'s {what} over {len(units)} resources adds different "
                                 "units: give a resource")
        return sum(getattr(s, what) for s in self.by_policy(policy)
                   if resource is None or s.resource == resource)


def default_totals(trace: Trace) -> dict[ResourceType, int]:
    """The pool a trace needs at least: its highest tick of summed demand, per resource."""
    out = {}
    for r in trace.resources:
        series = [v for (t, rr), v in trace.demand.items() if rr == r]
        out[r] = max(1, math.ceil(max(sum(col) for col in zip(*series))))
    return out


def replay(trace: Trace, policies: Sequence[str] = POLICIES, forecaster: str | dict | None = None,
           totals: dict[ResourceType, int] | None = None, headroom: float = 0.2,
           proactive_headroom: float = 0.0, window: int = 1, vpa_window: int = 300,
           priorities: dict[str, Priority] | None = None,
           reading: str = "demand") -> ReplayResult:
    if reading not in READINGS:
        raise ConfigError("--reading", f"{reading!r} is not one of {', '.join(READINGS)}")
    for p in policies:
        if p not in POLICIES:
            raise ConfigError("--policy", f"{p!r} is not one of {', '.join(POLICIES)}")
    pool_totals = dict(default_totals(trace))
    pool_totals.update(totals or {})
    result = ReplayResult(trace, pool_totals)
    for p in policies:
        result.scores += _run(trace, p, forecaster, pool_totals, headroom, proactive_headroom,
                              window, vpa_window, priorities or {}, reading)
    return result


class _LastValue:
    """``reactive``'s Forecast stage: the demand just observed."""

    def __init__(self, keys):
        self.keys = keys

    def __call__(self, obs: Observation) -> Forecasts:
        fc: dict[str, dict[ResourceType, float]] = {}
        for t, r in self.keys:
            fc.setdefault(t, {})[r] = obs.observed[t][r]
        return Forecasts(fc, fc, {}, {}, {})


class _Percentile:
    """``vpa``'s Forecast stage: the 90th percentile of the last ``window`` observed demands."""

    def __init__(self, keys, window: int, q: float = 0.9):
        self.keys = keys
        self.q = q
        self.recent = {k: deque(maxlen=window) for k in keys}

    def __call__(self, obs: Observation) -> Forecasts:
        fc: dict[str, dict[ResourceType, float]] = {}
        for t, r in self.keys:
            self.recent[(t, r)].append(obs.observed[t][r])
            fc.setdefault(t, {})[r] = quantile(self.recent[(t, r)], self.q, "higher")
        return Forecasts(fc, fc, {}, {}, {})


def _run(trace, policy, spec, totals, headroom, proactive_headroom, window, vpa_window,
         priorities, reading) -> list[Score]:
    """One policy over the trace, through the daemon's pipeline on a trace-backed host."""
    pool = ResourcePool()
    for r, total in totals.items():
        pool.register_resource(r, total)
    h = {"reactive": headroom, "vpa": 0.15, "proactive": proactive_headroom}.get(policy, 0.0)
    mgr = SwapManager(pool, headroom=h)
    for task in trace.tasks:
        mgr.add_task(ManagedTask(task, priorities.get(task, Priority.NORMAL),
                                 {r: Limits() for (t, r) in trace.demand if t == task}))
    scores = {k: Score(policy, k[0], k[1], forecasts=policy != "static") for k in trace.demand}
    drivers = {r: TraceDriver(r, {t: s for (t, rr), s in trace.demand.items() if rr == r},
                              totals[r], reading) for r in trace.resources}
    keys = list(trace.demand)
    if policy == "proactive":
        # the trace's tick, as the daemon gives its interval: seconds-wide buckets, period_s
        profiler = TaskProfiler(lambda t, r: make_forecaster(_scored_over(spec, window),
                                                             scale=totals[r],
                                                             tick_s=trace.interval),
                                interval=trace.interval)
        forecast = ProfileForecast(profiler, pool, drivers, window)
    elif policy == "vpa":
        forecast = _Percentile(keys, vpa_window)
    else:
        forecast = _LastValue(keys)
    pipe = Pipeline(Observe(drivers, pool, mgr), forecast, Allocate(mgr),
                    Enforce(drivers, pool, mgr))
    cgroups = {t: TaskCgroup(t, t, {}, True) for t in dict.fromkeys(t for t, _ in keys)}
    priority_of = {t: priorities.get(t, Priority.NORMAL).name.lower() for t in cgroups}
    if policy == "static":  # equal shares, enforced from the first tick and never changed
        for r, drv in drivers.items():
            members = [t for (t, rr) in keys if rr == r]
            for t in members:
                pool.set_allocation(r, t, totals[r] // len(members))
                drv.apply(cgroups[t], pool.allocation(r, t))
            drv.enforcing = True
    dt = trace.interval
    clock = SlotClock(dt)  # the recorder's late ticks, as the daemon's, keep the seasons' phase
    predicted: dict[tuple[str, ResourceType], float] = {}
    for i in range(len(trace.times)):
        for drv in drivers.values():
            drv.at(i)
        for k, series in trace.demand.items():
            d, s = series[i], scores[k]
            if drivers[k[1]].enforcing:
                alloc = pool.allocation(k[1], k[0])
                s.shortfall += max(0.0, d - alloc) * dt
                s.slack += max(0.0, alloc - d) * dt
            f = predicted.get(k)
            if f is not None:
                s.abs_err += abs(d - f)
                s.n_err += 1
                if d >= 1.0:
                    s.pct_err += abs(d - f) / d
                    s.n_pct += 1
        if policy == "static":
            continue
        rep = pipe.tick(i + 1, cgroups, priority_of, slots=clock.slots(trace.times[i]))
        for drv in drivers.values():
            drv.enforcing = True  # the allocation decided now is what each task has next tick
        for t, per_r in rep.forecast.next.items():
            for r, f in per_r.items():
                predicted[(t, r)] = f
        for t, per_r in rep.forecast.models.items():
            for r, m in per_r.items():
                scores[(t, r)].model = m
        for ch in rep.result.changes:
            if (ch.task, ch.resource) in scores:
                scores[(ch.task, ch.resource)].changes += 1
        for sw in rep.result.swaps:
            for name in (sw.source, sw.target):
                if (name, sw.resource) in scores:
                    scores[(name, sw.resource)].swaps += 1
    if policy == "reactive":
        for s in scores.values():
            s.model = "last_value"
    elif policy == "vpa":
        for s in scores.values():
            s.model = "p90"
    return list(scores.values())


#: reactive's headrooms for its frontier: from none at all up, finely to 3
FRONTIER_HEADROOMS = tuple(round(0.05 * i, 2) for i in range(61)) + (4.0, 5.0, 7.5, 10.0)


def frontier_of(runs: Sequence[ReplayResult], policy: str = "reactive"
                ) -> dict[tuple[str, ResourceType] | ResourceType, list[tuple[float, float]]]:
    """``(slack, shortfall)`` of ``policy`` in each run (one run per headroom), per task x
    resource and (key: the resource) summed over the tasks of each resource, never across
    resources (their units differ): the points :func:`at_equal_slack` reads."""
    out: dict = {}
    for res in runs[:1]:
        for r in res.trace.resources:
            out[r] = [(x.total(policy, "slack", r), x.total(policy, "shortfall", r))
                      for x in runs]
    for r in runs:
        for sc in r.by_policy(policy):
            out.setdefault((sc.task, sc.resource), []).append((sc.slack, sc.shortfall))
    return out


def reactive_frontier(trace: Trace, headrooms: Sequence[float] = FRONTIER_HEADROOMS, **kwargs):
    """Reactive replayed at each of ``headrooms`` (the other arguments as :func:`replay`'s):
    :func:`frontier_of` its runs.  A reactive replay takes milliseconds."""
    return frontier_of([replay(trace, ("reactive",), headroom=h, **kwargs) for h in headrooms])


def equal_slack_ratio(points: Sequence[tuple[float, float]], short: float, slack: float
                      ) -> tuple[float | None, str]:
    """Reactive's shortfall at ``slack`` (:func:`at_equal_slack`) and ``short`` over it, as
    printed: ``<`` first where ``slack`` is below the least reactive spends (the ratio is then to
    reactive's shortfall at its least headroom: ``points`` come in headroom order, as
    :func:`frontier_of` gives them), ``0/0`` where neither runs short.

    At the least headroom, not at the least slack: a task's slack can be least at a large
    headroom, where the other tasks' headroom takes the pool from it and it runs short.
    """
    at, mark = at_equal_slack(points, slack), ""
    if at is None and points:
        at, mark = points[0][1], "<"
    if at:
        return at, f"{mark}{short / at:.2f}"
    return at, "0/0" if not short else "-"


def at_equal_slack(points: Sequence[tuple[float, float]], slack: float) -> float | None:
    """Reactive's shortfall at ``slack``, from its ``(slack, shortfall)`` at several headrooms.

    The points' lower envelope (each point that has less shortfall than every point with less
    slack), read linearly between its neighbours: the shortfall a headroom between two measured
    ones gives, about.  Past the most slack measured, the least shortfall measured.  None where
    ``slack`` is below the least reactive spends at any headroom measured (at 0 it holds what it
    just saw: no headroom spends less).
    """
    env: list[tuple[float, float]] = []
    for sl, sh in sorted(points):
        if not env or sh < env[-1][1]:
            env.append((sl, sh))
    if not env or slack < env[0][0]:
        return None
    for (l0, s0), (l1, s1) in zip(env, env[1:]):
        if l0 <= slack <= l1:
            return s0 + (s1 - s0) * (slack - l0) / (l1 - l0) if l1 > l0 else min(s0, s1)
    return env[-1][1]


def _scored_over(spec, window: int):
    """Model selection scores candidates over the ticks the allocation looks at: ``window``,
    unless the spec says otherwise (a model that wins five ticks ahead may lose the next one)."""
    if spec is None or spec == "auto":
        return {"name": "auto", "horizon": window}
    if isinstance(spec, dict) and spec.get("name") == "auto" and "horizon" not in spec:
        return {**spec, "horizon": window}
    return spec
