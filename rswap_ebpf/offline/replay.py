"""Replay a recorded trace through the swap manager and the forecasters, without root.

Each policy gets its own pool and :class:`~rswap_ebpf.swap.manager.SwapManager` (the daemon's),
and every tick goes the daemon's way: the allocation decided at tick *t* is what the task has
during tick *t + 1*, and is scored against the demand recorded then.

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
the real driver reports one (:data:`KERNEL_CENSORS`) -- the same path as ``Daemon.tick``.  So a
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
from rswap_ebpf.predict.registry import make_forecaster
from rswap_ebpf.predict.profile import TaskProfiler
from rswap_ebpf.model.resources import ResourcePool, ResourceType
from rswap_ebpf.model.limits import Limits, Priority
from rswap_ebpf.swap.manager import ManagedTask, SwapManager
from rswap_ebpf.offline.trace import Trace

POLICIES = ("static", "reactive", "vpa", "proactive")

#: The least a cap lets a task use: the CPU driver never writes a quota under 1 ms per 100 ms
#: period (``enforce/cgroup.py``: V1_MIN_QUOTA_US), so a task held at 0 still runs at 10
#: millicores and is seen throttled; other resources are taken to pass at least one unit.
ENFORCED_FLOOR = {ResourceType.PROCESSOR_CYCLES: 10.0}
#: Resources whose driver tells the daemon when its cap held a task down (CPU: ``nr_throttled``
#: went up); for the others the manager judges by use against allocation (``censored=None``).
KERNEL_CENSORS = frozenset({ResourceType.PROCESSOR_CYCLES})
#: Resources whose driver also says how much its cap held back (CPU: :meth:`CpuDriver.withheld`,
#: from ``cpu.stat``'s throttled time), modelled by :func:`throttled_reading`.
KERNEL_READS = frozenset({ResourceType.PROCESSOR_CYCLES})
#: How replay models that reading on a throttled tick (``--reading``): ``demand``, the recorded
#: demand itself (the default); ``backlog``, what a backlog adds (:func:`throttled_reading`);
#: ``growth``, no reading at all: the manager's growth rule, as before round 7.
READINGS = ("demand", "backlog", "growth")


def throttled_reading(demand, cap, total, model: str = "backlog"):
    """Use + throttled time, as the CPU driver reads it, for a task held at ``cap`` below its
    ``demand`` (millicores; numbers or numpy arrays), at most ``total``.

    ``backlog``: a throttled thread waits runnable for as long as work it would have done is
    held back, so across a tick it had work in throughout, the reading runs linearly from the
    demand (cap at the demand) to a whole CPU per thread (cap 0), with the fewest threads that
    use the demand: ``d + (1 - cap/d) * (n*1000 - d)``, ``n = ceil(d/1000)``.  ``demand``: the
    demand itself.  Measured on this VM's 6.18 kernel (``tools/measure_throttle.py``, README
    round 7), held at 200 and 500 millicores for 3 s: ``backlog`` is within 5% for busy
    threads, a half-busy thread, rswap's demo spinners, ``stress-ng --cpu-load`` and ``dd``,
    where ``demand`` reads up to 37% low; both read low for two threads busy 30%.  In the second
    a burst begins in it is the other way: the reading is 0.03-1.3x the demand, as throttled
    time is credited only when a CFS period unthrottles the group, and ``backlog`` reads up to
    six times too high.  A trace does not say which ticks are which, so replay takes ``demand``
    unless told.
    """
    d = np.maximum(np.asarray(demand, dtype=float), 1e-9)
    if model == "demand":
        est = np.minimum(d, total)
    else:
        c = np.minimum(np.asarray(cap, dtype=float), d)
        whole = np.ceil(d / 1000.0 - 1e-9) * 1000.0
        est = np.minimum(d + (1.0 - c / d) * (whole - d), total)
    return float(est) if est.ndim == 0 else est


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


def _run(trace, policy, spec, totals, headroom, proactive_headroom, window, vpa_window,
         priorities, reading) -> list[Score]:
    pool = ResourcePool()
    for r, total in totals.items():
        pool.register_resource(r, total)
    h = {"reactive": headroom, "vpa": 0.15, "proactive": proactive_headroom}.get(policy, 0.0)
    mgr = SwapManager(pool, headroom=h)
    for task in trace.tasks:
        mgr.add_task(ManagedTask(task, priorities.get(task, Priority.NORMAL),
                                 {r: Limits() for (t, r) in trace.demand if t == task}))
    scores = {k: Score(policy, k[0], k[1], forecasts=policy != "static") for k in trace.demand}
    spec = _scored_over(spec, window)
    profiler = TaskProfiler(lambda t, r: make_forecaster(spec, scale=totals[r]))
    recent: dict[tuple[str, ResourceType], deque] = {k: deque(maxlen=vpa_window)
                                                     for k in trace.demand}
    dt = trace.interval
    if policy == "static":
        for r in trace.resources:
            members = [t for (t, rr) in trace.demand if rr == r]
            for t in members:
                pool.set_allocation(r, t, totals[r] // len(members))
    predicted: dict[tuple[str, ResourceType], float] = {}
    for i in range(len(trace.times)):
        # Before the first allocation nothing is capped yet (the daemon's first tick).
        capped = policy == "static" or i > 0
        observed: dict[str, dict[ResourceType, float]] = {}
        for k, series in trace.demand.items():
            d = series[i]
            s = scores[k]
            task, r = k
            used, censored, withheld = d, False, None
            if capped:
                alloc = pool.allocation(r, task)
                s.shortfall += max(0.0, d - alloc) * dt
                s.slack += max(0.0, alloc - d) * dt
                cap = max(float(alloc), ENFORCED_FLOOR.get(r, 1.0))
                used, censored = min(d, cap), d > cap
                if censored and reading != "growth" and r in KERNEL_READS:
                    withheld = throttled_reading(d, cap, totals[r], reading) - used
            f = predicted.get(k)
            if f is not None:
                s.abs_err += abs(d - f)
                s.n_err += 1
                if d >= 1.0:
                    s.pct_err += abs(d - f) / d
                    s.n_pct += 1
            seen = mgr.observed_demand(task, r, used, censored if r in KERNEL_CENSORS else None,
                                       withheld)
            observed.setdefault(task, {})[r] = seen
            recent[k].append(seen)
        if policy == "static":
            continue
        forecasts: dict[str, dict[ResourceType, float]] = {}
        releases: dict[str, dict[ResourceType, float]] = {}
        for (t, r) in trace.demand:
            seen = observed[t][r]
            if policy == "reactive":
                f = seen
            elif policy == "vpa":
                f = _percentile(recent[(t, r)], 0.9)
            else:
                profiler.update_prediction(t, r, seen)
                continue
            predicted[(t, r)] = f
            forecasts.setdefault(t, {})[r] = f
        if policy == "proactive":
            for t in trace.tasks:
                for r, p in profiler.get_predicted_needs(t, window).items():
                    predicted[(t, r)] = p.series[0]
                    forecasts.setdefault(t, {})[r] = p.peak
                    scores[(t, r)].model = p.model
                releases[t] = profiler.releases(t)
        res = mgr.proactive_allocation(forecasts, observed, releases)
        for ch in res.changes:
            if (ch.task, ch.resource) in scores:
                scores[(ch.task, ch.resource)].changes += 1
        for sw in res.swaps:
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


def format_equal_slack(result: ReplayResult, frontier, policy: str = "proactive") -> str:
    """``policy``'s shortfall against reactive's at the same slack, per task x resource and
    summed: the comparison that does not depend on reactive's one headroom."""
    lines = [f"At equal slack: {policy}'s shortfall / reactive's at {policy}'s slack (reactive "
             f"replayed at headroom {min(FRONTIER_HEADROOMS):g}-{max(FRONTIER_HEADROOMS):g}, "
             "read between them).",
             f"'<': {policy} spends less slack than reactive at any headroom; the ratio is to "
             "reactive's shortfall at no headroom.",
             f"{'TASK':<12} {'RES':<5} {'SHORT(u*s)':>11} {'SLACK(u*s)':>11} "
             f"{'REACTIVE SHORT':>15} {'RATIO':>7}"]
    rows = []
    for r in result.trace.resources:  # each resource in its own unit: no total across them
        rows += [((s.task, s.resource), s.task, s.resource.key, s.shortfall, s.slack)
                 for s in sorted(result.by_policy(policy), key=lambda s: s.task)
                 if s.resource == r]
        rows.append((r, "(all tasks)", r.key, result.total(policy, "shortfall", r),
                     result.total(policy, "slack", r)))
    for key, task, res, short, slack in rows:
        at, ratio = equal_slack_ratio(frontier.get(key, []), short, slack)
        lines.append(f"{task:<12.12} {res:<5} {short:>11.0f} {slack:>11.0f} "
                     f"{_fmt(at):>15} {ratio:>7}")
    return "\n".join(lines)


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


def _percentile(values, q: float) -> float:
    xs = sorted(values)
    if not xs:
        return 0.0
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _fmt(v: float | None, spec: str = ".0f") -> str:
    return "-" if v is None else format(v, spec)


def format_table(result: ReplayResult) -> str:
    """The per task x resource table, then per resource one line per policy (its tasks summed,
    in that resource's unit) with ratios vs reactive."""
    rw = max([5] + [len(s.resource.key) for s in result.scores])  # coproc:fpga0
    mw = max([15] + [len(s.model or "-") for s in result.scores])  # seasonal_fractional
    lines = [f"{'POLICY':<10} {'TASK':<12} {'RES':<{rw}} {'MODEL':<{mw}} {'MAE':>7} {'MAPE%':>6} "
             f"{'SHORT(u*s)':>11} {'SLACK(u*s)':>11} {'CHANGES':>7} {'SWAPS':>5}"]
    policies = list(dict.fromkeys(s.policy for s in result.scores))
    for p in policies:
        for s in sorted(result.by_policy(p), key=lambda s: (s.task, s.resource.key)):
            lines.append(f"{p:<10} {s.task:<12.12} {s.resource.key:<{rw}} {s.model or '-':<{mw}} "
                         f"{_fmt(s.mae):>7} {_fmt(s.mape):>6} {s.shortfall:>11.0f} "
                         f"{s.slack:>11.0f} {s.changes:>7} {s.swaps:>5}")
    lines.append("")
    ref = "reactive" if "reactive" in policies else None
    lines.append(f"{'POLICY':<10} {'RES':<{rw}} {'SHORT(u*s)':>11} {'SLACK(u*s)':>11}"
                 + (f" {'SHORT/reactive':>15} {'SLACK/reactive':>15}" if ref else ""))
    for r in result.trace.resources:  # one unit per line: no total across resources
        for p in policies:
            short, slack = result.total(p, "shortfall", r), result.total(p, "slack", r)
            line = f"{p:<10} {r.key:<{rw}} {short:>11.0f} {slack:>11.0f}"
            if ref:
                rs, rl = result.total(ref, "shortfall", r), result.total(ref, "slack", r)
                line += f" {_ratio(short, rs):>15} {_ratio(slack, rl):>15}"
            lines.append(line)
    return "\n".join(lines)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"
