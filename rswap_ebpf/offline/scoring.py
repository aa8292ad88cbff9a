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
from rswap_ebpf.offline.replay import (ReplayResult, default_totals, equal_slack_ratio,
                                       reactive_frontier, replay)
from rswap_ebpf.offline.trace import Trace
from rswap_ebpf.predict.period import detect_long
from rswap_ebpf.predict.registry import make_forecaster


def one_step_mae(spec, series: Sequence[float], scale: float) -> float | None:
    """The MAE of ``spec``'s 1-tick-ahead forecasts over ``series`` (learning as it goes)."""
    f = make_forecaster(spec, scale=scale)
    err, n = 0.0, 0
    for i, y in enumerate(series):
        if i:
            err += abs(y - f.forecast(1)[0])
            n += 1
        f.learn_one(y)
    return err / n if n else None


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
          policy: str = "proactive") -> dict:
    """The JSON-ready scores of ``result`` (see the module's docstring); ``frontier`` is
    :func:`~.replay.reactive_frontier` of the same trace, None to leave the ratios out."""
    trace = result.trace
    totals = result.totals
    runs = {(s.task, s.resource): s for s in result.by_policy(policy)}
    tasks: dict[str, dict] = {}
    resources: dict[str, dict] = {}
    for r in trace.resources:
        keys = sorted(k for k in trace.demand if k[1] == r)
        per_res = {"unit": r.unit, "pool": totals.get(r)}
        chosen_sum, sn_sum, alloc_sum, periods = 0.0, 0.0, 0.0, {}
        for key in keys:
            task = key[0]
            series = trace.demand[key]
            p = true_period(series)
            periods[task] = p
            chosen = one_step_mae(_point_spec(spec), series, totals[r])
            sn = one_step_mae({"name": "seasonal_naive", "period": max(1, p)}, series, totals[r])
            entry: dict = {"mae": {"chosen": _num(chosen), "seasonal_naive": _num(sn),
                                   "period": p}}
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
                          "allocated": _num(alloc_sum) if runs else None, "period": periods}
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
                **replay_args) -> dict:
    """Replay proactive (``spec``) on ``trace``, reactive at every headroom, and score them."""
    totals = {**default_totals(trace), **(totals or {})}
    result = replay(trace, ("proactive",), spec, totals, **replay_args)
    kw = {k: v for k, v in replay_args.items() if k in ("priorities", "reading")}
    return score(result, reactive_frontier(trace, totals=totals, **kw), spec)
