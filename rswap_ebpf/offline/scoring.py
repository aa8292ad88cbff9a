"""Scores of a replay per resource, each in its own unit: what ``rswap replay --json`` writes.

A trace's resources have different units (millicores, IO/s, bytes/s), so nothing here adds one
resource to another: every figure is per task x resource, or summed over the tasks of one
resource.  Per resource:

* ``ratio_at_equal_slack``: proactive's shortfall over reactive's at proactive's slack (reactive
  replayed at every headroom, :func:`~.replay.equal_slack_ratio`), summed over that resource's
  tasks; ``below_reactive_slack`` where proactive spends less slack than reactive at any
  headroom (the ratio is then to reactive at no headroom);
* ``mae``: the 1-tick-ahead MAE on the recorded demand, summed over the resource's tasks, of
  the proactive forecaster's point forecasts (``chosen``; for online selection, its selection on
  plain accuracy, ``loss="mae"``, one tick ahead) and of seasonal-naive given each task's period
  as found on the whole trace (``seasonal_naive``, its best case; ``period`` per task), and the
  MAE of the forecasts allocation used (``allocated``: with the pinball loss, raised to its
  quantile).

>>> from rswap_ebpf.offline.trace import Trace
>>> from rswap_ebpf.model.resources import ResourceType
>>> cpu = ResourceType.PROCESSOR_CYCLES
>>> tr = Trace(tuple(float(i) for i in range(60)),
...            {("web", cpu): tuple(900.0 if i % 6 < 2 else 100.0 for i in range(60))})
>>> out = score_trace(tr, {"name": "seasonal_naive", "period": 6})
>>> sorted(out["resources"]), out["resources"]["cpu"]["mae"]["period"]
(['cpu'], {'web': 6})
>>> out["resources"]["cpu"]["mae"]["chosen"] <= out["resources"]["cpu"]["mae"]["seasonal_naive"]
True
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from rswap_ebpf.model.resources import Resource
from rswap_ebpf.offline.replay import (ENFORCED_FLOOR, KERNEL_READS, ReplayResult,
                                       default_totals, equal_slack_ratio, reactive_frontier,
                                       replay, throttled_reading)
from rswap_ebpf.offline.trace import Trace
from rswap_ebpf.predict.period import detect_long
from rswap_ebpf.predict.registry import make_forecaster
from rswap_ebpf.runtime.pipeline import SlotClock


def one_step_mae(spec, series: Sequence[float], scale: float, keep: list | None = None,
                 tick_s: float | None = None,
                 times: Sequence[float] | None = None) -> float | None:
    """The MAE of ``spec``'s 1-tick-ahead forecasts over ``series`` (learning as it goes);
    the forecaster is appended to ``keep`` where given (to read what it ended on).  With the
    samples' ``times`` (and ``tick_s``), each sample is learnt once per slot of the clock it
    covers, as the replay's profiles learn it (:class:`~rswap_ebpf.runtime.pipeline.SlotClock`)."""
    f = make_forecaster(spec, scale=scale, tick_s=tick_s)
    clock = SlotClock(tick_s) if times is not None and tick_s else None
    err, n = 0.0, 0
    for i, y in enumerate(series):
        if i:
            err += abs(y - f.forecast(1)[0])
            n += 1
        for _ in range(clock.slots(times[i]) if clock is not None else 1):
            f.learn_one(y)
    if keep is not None:
        keep.append(f)
    return err / n if n else None


def _ended_on(f) -> dict:
    """The model and season a forecaster ended a trace on (online selection: its serving
    candidate, the raw search's period and the long one, with its confidence)."""
    out = {"model": getattr(f, "serving_model", None) or getattr(f, "name", type(f).__name__)}
    season = getattr(f, "season", None)
    if callable(season):
        p, conf, source = season()
        out.update(period=p, period_confidence=conf, period_source=source,
                   raw_period=f.period, long_period=f.long_period,
                   long_confidence=round(f._long.confidence, 3))
    return out


def true_period(series: Sequence[float]) -> int:
    """The period of ``series`` seen on all of it at once (0: none): what seasonal-naive is
    given as its best case."""
    return detect_long(np.asarray(series, dtype=float))[0]


def _point_spec(spec):
    """The proactive forecaster scored on plain accuracy: online selection ranks by MAE, one
    tick ahead; any other forecaster as it is."""
    if spec is None or spec == "auto":
        return {"name": "auto", "loss": "mae", "horizon": 1}
    if isinstance(spec, dict) and spec.get("name") == "auto":
        return {**spec, "loss": "mae", "horizon": 1}
    return spec


def _num(v: float | None, digits: int = 3) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), digits)


def score(result: ReplayResult, frontier: dict | None, spec=None,
          policy: str = "proactive", periods: dict[str, int] | None = None) -> dict:
    """The JSON-ready scores of ``result`` (see the module's docstring); ``frontier`` is
    :func:`~.replay.reactive_frontier` of the same trace, None to leave the ratios out.
    ``periods``: task -> the period (ticks) seasonal-naive is given, where it is known (a
    recording's own); the others' are found on the whole trace."""
    trace = result.trace
    totals = result.totals
    runs = {(s.task, s.resource): s for s in result.by_policy(policy)}
    tasks: dict[str, dict] = {}
    resources: dict[str, dict] = {}
    for r in trace.resources:
        keys = sorted(k for k in trace.demand if k[1] == r)
        per_res = {"unit": r.unit, "pool": totals.get(r)}
        chosen_sum, sn_sum, alloc_sum, given = 0.0, 0.0, 0.0, {}
        for key in keys:
            task = key[0]
            series = trace.demand[key]
            p = (periods or {}).get(task) or true_period(series)
            given[task] = p
            kept: list = []
            chosen = one_step_mae(_point_spec(spec), series, totals[r], kept, trace.interval,
                                  trace.times)
            sn = one_step_mae({"name": "seasonal_naive", "period": max(1, p)}, series, totals[r],
                              tick_s=trace.interval, times=trace.times)
            entry: dict = {"mae": {"chosen": _num(chosen), "seasonal_naive": _num(sn),
                                   "period": p, "chosen_ended_on": _ended_on(kept[0])}}
            s = runs.get(key)
            if s is not None:
                entry.update(model=s.model, shortfall=_num(s.shortfall, 1),
                             slack=_num(s.slack, 1))
                entry["mae"]["allocated"] = _num(s.mae)
                alloc_sum += s.mae or 0.0
                if frontier is not None:
                    at, text = equal_slack_ratio(frontier.get(key, []), s.shortfall, s.slack)
                    entry.update(_ratio_fields(at, text, s.shortfall))
            chosen_sum += chosen or 0.0
            sn_sum += sn or 0.0
            tasks.setdefault(task, {})[r.key] = entry
        per_res["mae"] = {"chosen": _num(chosen_sum), "seasonal_naive": _num(sn_sum),
                          "allocated": _num(alloc_sum) if runs else None, "period": given}
        if runs:
            short = result.total(policy, "shortfall", r)
            slack = result.total(policy, "slack", r)
            per_res.update(shortfall=_num(short, 1), slack=_num(slack, 1))
            if frontier is not None:
                at, text = equal_slack_ratio(frontier.get(r, []), short, slack)
                per_res.update(_ratio_fields(at, text, short))
        resources[r.key] = per_res
    return {"trace": trace.source, "ticks": len(trace.times), "interval_s": trace.interval,
            "policy": policy, "resources": resources, "tasks": tasks}


def _ratio_fields(at: float | None, text: str, short: float) -> dict:
    """``ratio_at_equal_slack`` as a number (None where neither runs short or reactive never
    does), reactive's shortfall it is over, and whether proactive spent less slack than
    reactive at any headroom."""
    ratio = short / at if at else (0.0 if not short else None)
    return {"ratio_at_equal_slack": _num(ratio), "reactive_shortfall_at_equal_slack": _num(at, 1),
            "below_reactive_slack": text.startswith("<")}


def score_trace(trace: Trace, spec=None, totals: dict[Resource, int] | None = None,
                periods: dict[str, int] | None = None, **replay_args) -> dict:
    """Replay proactive (``spec``) on ``trace``, reactive at every headroom, and score them."""
    totals = {**default_totals(trace), **(totals or {})}
    result = replay(trace, ("proactive",), spec, totals, **replay_args)
    kw = {k: v for k, v in replay_args.items() if k in ("priorities", "reading")}
    return score(result, reactive_frontier(trace, totals=totals, **kw), spec,
                 periods=periods)


#: the clairvoyant bound's allocation levels: a pool of more units is cut into this many cells,
#: so its cost is the trace's length x this, whatever the pool's size (a 132 MB/s net pool walked
#: unit by unit took 11.5 GB)
BOUND_LEVELS = 1024
#: the Lagrange multipliers the bound is the best of
BOUND_LAMS = np.concatenate(([0.0], np.geomspace(1e-3, 50.0, 60)))


def least_costs(series, total: int, lams, floor_units: float, growth: float = 2.0,
                reading: str = "growth", levels: int = BOUND_LEVELS) -> np.ndarray:
    """Per ``lam`` of ``lams``: a lower bound on the shortfall + lam * slack of any allocation
    sequence on the daemon's path (exactly the least, where the pool has at most ``levels``
    units).

    The path: allocations are whole units; the allocation for tick i+1 is never below the use
    observed at tick i (``SwapManager.demand``), and a tick capped below its demand is observed
    as ``growth`` times its allocation, at most the pool (``SwapManager.observed_demand``), or as
    the CPU driver's throttled-time ``reading`` models it (:func:`~.replay.throttled_reading`).
    Beyond that each tick's allocation is free, as if the policy knew the future: dynamic
    programming over the allocation, per task (the pool never binding), every ``lam`` at once.

    A pool of more than ``levels`` units is cut into ``levels`` equal cells and the program runs
    over cells, each charged the least any allocation in it costs and allowed the lowest
    observation any allows next (an observation is monotone between a cell's edge and the
    demand, so its least is at one of them): a relaxation, so still a lower bound, at a cost
    that does not grow with the pool.
    """
    lams = np.asarray(lams, dtype=float)[:, None]
    if total + 1 <= levels:
        lo = hi = np.arange(total + 1, dtype=float)
    else:
        edges = np.linspace(0.0, float(total), levels + 1)
        lo, hi = edges[:-1], edges[1:]
    value = np.zeros((len(lams), len(lo)))

    def observed(x: np.ndarray, d: float) -> np.ndarray:
        cap = np.maximum(x, floor_units)
        used = np.minimum(d, cap)
        if reading != "growth":
            grown = throttled_reading(np.full_like(cap, d), cap, total, reading)
        else:
            grown = np.minimum(np.maximum(np.maximum(x, used), 1.0) * growth, total)
        return np.where(d > cap, np.maximum(used, grown), used)

    for d in reversed(series[1:]):
        d = float(d)
        inside = (lo <= d) & (d <= hi)
        obs = np.minimum(observed(lo, d), observed(np.minimum(hi, d), d))
        obs = np.where(inside, np.minimum(obs, d), obs)
        nxt = np.minimum(np.searchsorted(hi, obs - 1e-9, side="left"), len(lo) - 1)
        best_from = np.minimum.accumulate(value[:, ::-1], axis=1)[:, ::-1]
        value = (np.maximum(0.0, d - hi) + lams * np.maximum(0.0, lo - d)) + best_from[:, nxt]
    # the first tick runs uncapped
    first = min(int(np.searchsorted(hi, float(series[0]) - 1e-9, side="left")), len(lo) - 1)
    return np.minimum.accumulate(value[:, ::-1], axis=1)[:, ::-1][:, first]


def least_cost(series, total: int, lam: float, floor_units: float, growth: float = 2.0,
               reading: str = "growth", levels: int = BOUND_LEVELS) -> float:
    """:func:`least_costs` for one ``lam``."""
    return float(least_costs(series, total, [lam], floor_units, growth, reading, levels)[0])


def clairvoyant_bound(trace: Trace, resource: Resource, slack_budget: float,
                      reading: str = "demand", totals: dict | None = None,
                      levels: int = BOUND_LEVELS) -> float:
    """A shortfall (unit*s) of ``resource``'s tasks that no policy on the daemon's allocation
    path, however good its forecasts, goes below at a slack of at most ``slack_budget``
    (unit*s): the Lagrangian dual of :func:`least_costs`, max over lam of (least shortfall +
    lam * slack) - lam * budget.  Time: ticks x ``levels`` x the multipliers, not the pool."""
    totals = {**default_totals(trace), **(totals or {})}
    budget = slack_budget / trace.interval  # least_costs counts unit*ticks
    v = np.zeros(len(BOUND_LAMS))
    for (t, r), s in trace.demand.items():
        if r != resource:
            continue
        v += least_costs(list(s), totals[r], BOUND_LAMS, ENFORCED_FLOOR.get(r, 1.0),
                         reading=reading if r in KERNEL_READS else "growth", levels=levels)
    return float(max(0.0, np.max(v - BOUND_LAMS * budget))) * trace.interval
