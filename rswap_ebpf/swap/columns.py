"""One resource's allocation as numpy columns: the same answer as the manager's per-task loop.

:meth:`SwapManager.proactive_allocation` asks, for every resource, each task's demand, the
anti-thrashing policy's adjustment, the tiered max-min share and the changes to apply.  Done
one task at a time that is tens of Python calls per task and resource: at 10,000 tasks x 6
resources more than a second a tick.  Here each step is a few array operations over the tasks
of one resource, in the manager's task order, and the results (changes, swaps, shortfalls,
demands, the pool's allocations, the policy's counters) are the ones the loop produces, in the
same order.  ``tests/unit/swap/test_columns.py`` compares the two on random pools.

Integer columns are int64 and every comparison of an integer with a float is exact only below
2**53, so :func:`allocate` answers ``False`` (and changes nothing) when a quantity is larger,
or a value is of a kind it does not model; the manager then runs its loop for that resource.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from itertools import repeat

import numpy as np

from rswap_ebpf.model.limits import Priority

#: below this every integer the columns hold compares exactly with a float
EXACT = float(2**53)

_EMPTY: Mapping = {}


class TaskColumns:
    """The manager's tasks as columns: names, tasks, each one's place in name order, its
    priority and, per resource, its limits.  Built when the task set changes (tasks are
    frozen: the same objects have the same limits), kept while it does not."""

    def __init__(self, names: list[str], tasks: list):
        self.names, self.tasks = names, tasks
        order = sorted(range(len(names)), key=names.__getitem__)
        self.rank = np.empty(len(names), dtype=np.int64)
        self.rank[order] = np.arange(len(names))
        self.prio = np.fromiter((int(t.priority) for t in tasks), dtype=np.int64,
                                count=len(tasks))
        self._limits: dict = {}
        self._keys: dict = {}

    def same(self, names: list[str], tasks: list) -> bool:
        return names == self.names and len(tasks) == len(self.tasks) and \
            all(map(operator.is_, tasks, self.tasks))

    def keys(self, r) -> list:
        """``(name, r)`` for every task: the keys of the result's demands and the judged set."""
        keys = self._keys.get(r)
        if keys is None:
            keys = self._keys[r] = [(n, r) for n in self.names]
        return keys

    def transpose(self, per_task: Mapping, resources: Sequence) -> dict:
        """``{task: {resource: value}}`` as ``{resource: [value or None per task]}``."""
        rows = [list(map(per_task.get(n, _EMPTY).get, resources)) for n in self.names]
        if not rows:
            return {r: [] for r in resources}
        return dict(zip(resources, map(list, zip(*rows))))

    def limits(self, r):
        """(has r, min_units, max_units or -1) per task: whether r is in its limits, and its
        bounds (min and max None when the bounds do not fit int64)."""
        cached = self._limits.get(r)
        if cached is None:
            lims = [t.limits.get(r) for t in self.tasks]
            has = np.fromiter((lim is not None for lim in lims), dtype=bool, count=len(lims))
            try:
                lo = np.array([lim.min_units if lim is not None else 0 for lim in lims],
                              dtype=np.int64)
                hi = np.array([-1 if lim is None or lim.max_units is None else lim.max_units
                               for lim in lims], dtype=np.int64)
            except (OverflowError, TypeError, ValueError):
                lo = hi = None
            cached = self._limits[r] = (has, lo, hi)
        return cached


def allocate(mgr, r, cols: TaskColumns, fl: list, seen: list, rel, result) -> bool:
    """Allocate ``r`` as ``SwapManager.proactive_allocation``'s loop does; False if it could not
    (nothing changed then).  ``fl``, ``seen``: each task's forecast and observed demand of
    ``r`` (None: none), in ``cols`` order (:meth:`TaskColumns.transpose`)."""
    has, lo, hi = cols.limits(r)
    if lo is None:
        return False
    names, rank, prio, keys = cols.names, cols.rank, cols.prio, cols.keys(r)
    if None in fl:
        inc = np.flatnonzero(np.fromiter((f is not None for f in fl), dtype=bool,
                                         count=len(fl)) | has)
        if inc.size != len(names):
            keep = inc.tolist()
            names = [names[i] for i in keep]
            keys = [keys[i] for i in keep]
            fl = [fl[i] for i in keep]
            seen = [seen[i] for i in keep]
            rank, prio, lo, hi = rank[inc], prio[inc], lo[inc], hi[inc]
    if not names:
        return True
    if rel:
        pos = None
        for n, lows in rel.items():
            low = lows.get(r) if lows else None
            if low is None or not math.isfinite(low):
                continue
            pos = pos or {m: i for i, m in enumerate(names)}
            i = pos.get(n)
            if i is not None and seen[i] is not None:
                seen[i] = min(seen[i], max(0.0, low))
    try:
        total = mgr.pool.total(r)
        demands = _demands(mgr, r, keys, lo, hi, fl, seen, total)
    except (OverflowError, TypeError, ValueError):
        return False
    if demands is None:
        return False
    d, lo, hi = demands
    held_map = mgr.pool.allocations(r)
    held = [held_map.get(n, 0) for n in names]
    if max(held) >= EXACT or total >= EXACT:
        return False
    now = np.array(held, dtype=np.int64)

    policy = mgr.policy
    shared = d if policy is None else policy.adjust_columns(r, total, names, d, now)
    targets = share(total, shared, lo, prio, rank)
    apply_targets(mgr, r, names, keys, d, targets, now, prio, rank, total, result)
    return True


def _demands(mgr, r, keys, lo, hi, fl, seen, total):
    """``SwapManager.demand`` of every task, as (demands, min_units, max_units or -1)."""
    if lo.min() < 0 or lo.max() >= EXACT or hi.max() >= EXACT or \
            lo.astype(np.float64).sum() >= EXACT:
        return None
    f = np.array([0.0 if x is None else x for x in fl], dtype=np.float64)
    obs = np.array([x or 0.0 for x in seen], dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.isfinite(f) & np.isfinite(obs)
        want = np.where(finite, np.maximum(np.maximum(0.0, f), obs), float(total))
        ask = want * (1.0 + mgr.headroom)
        sat = mgr.saturation
        judged = mgr._judged
        if judged and 0.0 < sat <= 1.0:
            j = np.fromiter(map(judged.__contains__, keys), dtype=bool, count=len(keys))
            j &= want > 0
            if j.any():
                ask = np.where(j, np.maximum(ask, np.floor(want / sat) + 1.0), ask)
    if not np.isfinite(ask).all() or ask.max() >= EXACT:
        return None
    d = np.ceil(ask).astype(np.int64)
    d = np.where(hi >= 0, np.minimum(d, hi), d)
    d = np.maximum(d, lo)
    holds = mgr.admission_holds
    if holds:
        pos = {k[0]: i for i, k in enumerate(keys)}
        for n, hold in holds.items():
            i = pos.get(n)
            if i is None or r not in hold.grant:
                continue
            v = max(int(d[i]), hold.grant[r])
            if hi[i] >= 0:
                v = min(v, int(hi[i]))
            v = max(v, int(lo[i]))
            if v >= EXACT:
                return None
            d[i] = v
    return d, lo, hi


def share(total: int, demands: np.ndarray, lo: np.ndarray, prio: np.ndarray,
          rank: np.ndarray) -> np.ndarray:
    """``SwapManager._share``: minimums first (tier, then name order), then tier by tier,
    water-filled max-min fairly inside the first tier that does not fit."""
    if int(lo.sum()) <= total:
        grant = lo.copy()
        left = total - int(lo.sum())
    else:
        order = np.lexsort((rank, prio))
        m = lo[order]
        before = np.cumsum(m) - m
        g = np.clip(total - before, 0, m)
        grant = np.empty_like(lo)
        grant[order] = g
        left = total - int(g.sum())
    for tier in Priority:
        extra = demands - grant
        members = np.flatnonzero((prio == int(tier)) & (extra > 0))
        if not members.size:
            continue
        ex = extra[members]
        need = int(ex.sum())
        if need <= left:
            grant[members] += ex
            left -= need
            continue
        pending = ex.copy()
        alive = members
        while alive.size and left > 0:
            share_ = left // alive.size
            if share_ == 0:
                # one unit each to the first ``left`` of them by name
                first = alive[np.argsort(rank[alive], kind="stable")[:left]]
                grant[first] += 1
                left = 0
                break
            give = np.minimum(share_, pending)
            grant[alive] += give
            left -= int(give.sum())
            pending = pending - give
            keep = pending > 0
            alive, pending = alive[keep], pending[keep]
        break
    return grant


def apply_targets(mgr, r, names, keys, demands, targets, current, prio, rank, total,
                  result) -> None:
    """``SwapManager._apply_targets``: shortfalls in task order, downs in tier and name order
    (the units a shortfall gives up kept for the swaps), then ups in tier and name order, fed
    from the free pool first and then from what lower tiers gave up, first given up first
    taken."""
    from rswap_ebpf.swap.manager import Change, Shortfall, Swap

    dm = demands.tolist()
    tg = targets.tolist()
    cur = current.tolist()
    allocated = mgr.pool.allocated(r)
    if allocated - int(current.sum()) + int(targets.sum()) > total:
        # tasks outside this share hold units: the loop's checks say what is refused
        order = np.lexsort((rank, prio)).tolist()
        mgr._apply_targets(r, dict(zip(names, dm)), {names[i]: tg[i] for i in order}, result)
        return
    result.demands.update(zip(keys, dm))
    short = np.flatnonzero(targets < demands).tolist()
    result.shortfalls.extend([Shortfall(names[i], r, dm[i], tg[i]) for i in short])
    # the loop's targets come in tier and name order, and so do its downs and ups
    down = np.flatnonzero(targets < current)
    down = down[np.lexsort((rank[down], prio[down]))]
    up = np.flatnonzero(targets > current)
    changes = result.changes
    prio_down = (targets[down] < demands[down])
    reasons = ["priority" if p else "reclaim" for p in prio_down.tolist()]
    changes.extend([Change(names[i], r, cur[i], tg[i], why)
                    for i, why in zip(down.tolist(), reasons)])
    freed = down[prio_down]
    amounts = (current[freed] - targets[freed]).astype(np.int64)
    allocated_after_down = allocated - int((current[down] - targets[down]).sum())
    free_before = total - allocated_after_down - int(amounts.sum())
    if up.size:
        up = up[np.lexsort((rank[up], prio[up]))]
        need = (targets[up] - current[up]).astype(np.int64)
        free = max(free_before, 0)
        took = np.clip(free - (np.cumsum(need) - need), 0, need)
        residual = need - took
        if freed.size and residual.any():
            _swaps(r, names, up, residual, freed, amounts, prio, result, Swap)
    _assign(mgr, r, names, down, up, targets)
    changes.extend([Change(names[i], r, cur[i], tg[i], "forecast") for i in up.tolist()])


def _swaps(r, names, up, residual, freed, amounts, prio, result, Swap) -> None:
    """What each up takes from the units lower tiers gave up: tier by tier, the ups in order
    take from the freed units of strictly lower tiers, first freed first taken."""
    left = amounts.copy()
    up_prio = prio[up]
    fprio = prio[freed]
    out = []
    for tier in np.unique(up_prio).tolist():
        sel = np.flatnonzero((up_prio == tier) & (residual > 0))
        items = np.flatnonzero((fprio > tier) & (left > 0))
        if not sel.size or not items.size:
            continue
        a = np.cumsum(residual[sel])
        b = np.cumsum(left[items])
        end = min(int(a[-1]), int(b[-1]))
        pts = np.unique(np.concatenate(([0], a[a <= end], b[b <= end])))
        start, size = pts[:-1], np.diff(pts)
        keep = size > 0
        start, size = start[keep], size[keep]
        i = np.searchsorted(a, start, side="right")
        j = np.searchsorted(b, start, side="right")
        np.subtract.at(left, items[j], size)
        out.extend(zip(up[sel[i]].tolist(), freed[items[j]].tolist(), size.tolist()))
    if not out:
        return
    # the loop appends swaps up by up, in the ups' order: tiers come in that order already
    result.swaps.extend([Swap(r, names[src], names[dst], units, "priority")
                         for dst, src, units in out])


def _assign(mgr, r, names, down, up, targets) -> None:
    """Set the downs then the ups, as ``set_allocation`` would one by one (already checked:
    every value is a unit count and the sum fits the total)."""
    order = np.concatenate((down, up)).tolist()
    mgr.pool.assign(r, [names[i] for i in order], targets[order].tolist())


def observed(mgr, r, used: Mapping[str, float], held: Mapping[str, int]) -> dict | None:
    """``SwapManager.observed_demands`` where no task has a kernel flag: every task judged by
    its use against what it holds, and only those at the saturation line go through
    ``observed_demand``.  None (nothing changed) where a value is not a float or a holding is
    too large to compare exactly."""
    values = list(used.values())
    if set(map(type, values)) != {float}:
        return None
    hs = list(map(held.get, used, repeat(0)))
    if max(hs) >= EXACT:
        return None
    mgr._judged.update(zip(used, repeat(r)))
    h = np.array(hs, dtype=np.float64)
    u = np.array(values, dtype=np.float64)
    at_line = np.flatnonzero((h > 0) & (u >= mgr.saturation * h))
    out = dict(used)
    if at_line.size:
        names = list(used)
        for i in at_line.tolist():
            out[names[i]] = mgr.observed_demand(names[i], r, values[i])
    return out
