"""Property tests of swapping under contention: random pools, tasks, priorities and forecasts.

Every tick, whatever the forecasts and whether the anti-thrashing policy is on:
pool invariants hold; minimums are guarantees; maximums are respected; no task of a higher tier
is short while a lower tier holds more than its minimum; a short tier is shared max-min fairly
(minimums are reserved first, the rest water-filled).
"""
from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rswap_ebpf.model.resources import ResourcePool, ResourceType
from rswap_ebpf.model.limits import Limits, Priority
from rswap_ebpf.swap.manager import ManagedTask, SwapManager
from rswap_ebpf.swap.policy import StabilityPolicy

CPU = ResourceType.PROCESSOR_CYCLES


@st.composite
def scenarios(draw):
    total = draw(st.integers(0, 4000))
    n = draw(st.integers(1, 7))
    tasks = []
    for i in range(n):
        lo = draw(st.integers(0, 600))
        hi = draw(st.one_of(st.none(), st.integers(lo, lo + 3000)))
        prio = draw(st.sampled_from(list(Priority)))
        tasks.append(ManagedTask(f"t{i}", prio, {CPU: Limits(lo, hi)}))
    ticks = draw(st.lists(
        st.lists(st.floats(0, 5000, allow_nan=False), min_size=n, max_size=n),
        min_size=1, max_size=8))
    headroom = draw(st.sampled_from([0.0, 0.2]))
    policy = draw(st.one_of(st.none(), st.builds(
        StabilityPolicy, hold_ticks=st.integers(0, 4), deadband=st.sampled_from([0.0, 0.1]),
        max_step_down=st.sampled_from([0.25, 100, 1000]))))
    return total, tasks, ticks, headroom, policy


def _check(m: SwapManager, tasks, result):
    pool = m.pool
    pool.check()
    alloc = {t.name: pool.allocation(CPU, t.name) for t in tasks}
    assert sum(alloc.values()) <= pool.total(CPU)
    mins_fit = sum(t.limit(CPU).min_units for t in tasks) <= pool.total(CPU)
    short = {s.task for s in result.shortfalls}
    for t in tasks:
        lim = t.limit(CPU)
        if mins_fit:
            assert alloc[t.name] >= lim.min_units, (t, alloc)
        if lim.max_units is not None:
            assert alloc[t.name] <= max(lim.max_units, lim.min_units)
    for s in result.shortfalls:
        hi = m.tasks[s.task]
        assert s.granted == alloc[s.task] < s.wanted
        if not mins_fit:
            continue
        for lo in tasks:
            if lo.priority > hi.priority:
                assert alloc[lo.name] <= lo.limit(CPU).min_units, (
                    f"{s.task} ({hi.priority.name}) short by {s.missing} while {lo.name} "
                    f"({lo.priority.name}) holds {alloc[lo.name]} > min", alloc)
        for peer in tasks:
            if peer.priority == hi.priority and peer.name != s.task:
                # minimums are reserved first, then what is left is water-filled: no peer got
                # more above its minimum than the short task did (one unit of rounding)
                extra = alloc[s.task] - hi.limit(CPU).min_units
                assert alloc[peer.name] - peer.limit(CPU).min_units <= extra + 1, alloc
    assert short <= set(alloc)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_invariants_hold_every_tick(sc):
    total, tasks, ticks, headroom, policy = sc
    pool = ResourcePool()
    pool.register_resource(CPU, total)
    m = SwapManager(pool, headroom=headroom, policy=policy)
    for t in tasks:
        m.add_task(t)
    for forecasts in ticks:
        res = m.proactive_allocation({t.name: {CPU: f} for t, f in zip(tasks, forecasts)})
        _check(m, tasks, res)
        for rec in m.swap_log:
            assert rec.reason in {"forecast", "priority", "reclaim", "release", "swap"}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 2000, allow_nan=False), min_size=2, max_size=30),
       st.integers(0, 4), st.sampled_from([0.0, 0.1]), st.sampled_from([50, 200, 0.25]))
def test_policy_holds_before_falling_and_bounds_each_fall(forecasts, hold, band, step):
    """A lone task (no pressure from others): falls come only after ``hold`` low ticks, bounded."""
    pool = ResourcePool()
    pool.register_resource(CPU, 2000)
    policy = StabilityPolicy(hold_ticks=hold, deadband=band, max_step_down=step)
    m = SwapManager(pool, headroom=0.0, policy=policy)
    m.add_task(ManagedTask("a", Priority.NORMAL, {CPU: Limits(0, None)}))
    max_fall = int(step * 2000) if step < 1 else step
    allocs = []
    for f in forecasts:
        m.proactive_allocation({"a": {CPU: f}})
        allocs.append(pool.allocation(CPU, "a"))
    for i in range(1, len(allocs)):
        if allocs[i] >= allocs[i - 1]:
            continue
        assert allocs[i - 1] - allocs[i] <= max_fall
        continuing = i >= 2 and allocs[i - 1] < allocs[i - 2]
        # otherwise the allocation was held flat for `hold` ticks before it fell
        assert continuing or (i - 1 - hold >= 0
                              and len(set(allocs[i - 1 - hold:i])) == 1), allocs


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 2000, allow_nan=False), st.floats(0, 2000, allow_nan=False)),
                min_size=3, max_size=30))
def test_policy_never_delays_a_critical_rise(pairs):
    """Hysteresis applies to falls only: a critical task's rising demand is served the same tick."""
    pool = ResourcePool()
    pool.register_resource(CPU, 2000)
    m = SwapManager(pool, headroom=0.0, policy=StabilityPolicy(hold_ticks=5))
    m.add_task(ManagedTask("web", Priority.CRITICAL, {CPU: Limits(0, None)}))
    m.add_task(ManagedTask("batch", Priority.BATCH, {CPU: Limits(100, None)}))
    for web, batch in pairs:
        m.proactive_allocation({"web": {CPU: web}, "batch": {CPU: batch}})
        assert pool.allocation(CPU, "web") >= min(math.ceil(web), 1900)
        assert pool.allocation(CPU, "batch") >= 100
