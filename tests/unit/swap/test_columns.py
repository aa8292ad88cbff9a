"""The column allocator (swap/columns.py) against the manager's per-task loop, on random pools.

Two managers get the same tasks and the same ticks, one allocating by the loop and one by the
columns; every tick their results (changes, swaps, shortfalls, demands, in order), the pool's
allocations (in order), the policy's counters and the swap log must be the same, or both must
refuse the tick with the same error.
"""
from __future__ import annotations

import math
import random

import pytest

from rswap_ebpf.model.limits import Limits, Priority
from rswap_ebpf.model.resources import ResourceId, ResourcePool, ResourceType
from rswap_ebpf.swap.manager import ManagedTask, SwapManager
from rswap_ebpf.swap.policy import StabilityPolicy

CPU = ResourceType.PROCESSOR_CYCLES
IO = ResourceType.STORAGE_IOPS
FPGA = ResourceId(ResourceType.SPECIALIZED_COPROC, "fpga0")
RESOURCES = (CPU, IO, FPGA)


def _value(rng: random.Random, scale: float):
    roll = rng.random()
    if roll < 0.03:
        return math.inf
    if roll < 0.06:
        return math.nan
    if roll < 0.1:
        return 0.0
    if roll < 0.12:
        return -rng.random() * scale
    return rng.random() * scale * rng.choice((0.2, 1.0, 3.0))


def _scenario(seed: int):
    rng = random.Random(seed)
    n = rng.randint(1, 90)
    totals = {r: rng.choice((0, 50, 500, 5000, 100_000)) for r in RESOURCES}
    tasks = []
    for i in range(n):
        limits = {}
        for r in RESOURCES:
            if rng.random() < 0.15:
                continue  # no limits named for r
            lo = rng.choice((0, 0, 0, 1, 5, 40, 300))
            hi = rng.choice((None, None, lo, lo + 10, lo + 1000))
            limits[r] = Limits(lo, hi)
        # names out of insertion order, so name order and task order differ
        tasks.append(ManagedTask(f"t{rng.randint(0, 10**6)}-{i}", rng.choice(list(Priority)),
                                 limits))
    policy = None
    if rng.random() < 0.7:
        policy = dict(hold_ticks=rng.randint(0, 3), deadband=rng.choice((0.0, 0.1, 0.3)),
                      max_step_down=rng.choice((0.25, 0.5, 3, 100)),
                      max_step_up=rng.choice((None, None, 0.1, 20)))
    headroom = rng.choice((0.0, 0.2))
    saturation = rng.choice((0.9, 1.0, 0.0))
    ticks = []
    for _ in range(rng.randint(1, 7)):
        fc, obs, rel = {}, {}, {}
        for t in tasks:
            if rng.random() < 0.05:
                continue  # no forecast for this task at all
            fc[t.name] = {r: _value(rng, totals[r] / max(1, n) * 2) for r in RESOURCES
                          if rng.random() < 0.9}
            if rng.random() < 0.8:
                obs[t.name] = {r: _value(rng, totals[r] / max(1, n) * 2) for r in RESOURCES
                               if rng.random() < 0.8}
            if rng.random() < 0.2:
                rel[t.name] = {r: rng.choice((0.0, 3.0, math.nan, math.inf, -1.0))
                               for r in RESOURCES if rng.random() < 0.5}
        judged = [(t.name, r) for t in tasks for r in RESOURCES if rng.random() < 0.3]
        holds = [(t.name, {r: rng.randint(1, 50) for r in RESOURCES if rng.random() < 0.5})
                 for t in tasks if rng.random() < 0.05]
        ticks.append((fc, obs, rel, judged, holds))
    foreign = rng.random() < 0.1  # a task outside the manager holds units of CPU
    return totals, tasks, policy, headroom, saturation, ticks, foreign


def _manager(sc, columns: bool) -> SwapManager:
    totals, tasks, policy, headroom, saturation, _, foreign = sc
    pool = ResourcePool()
    for r in RESOURCES:
        pool.register_resource(r, totals[r])
    if foreign and totals[CPU]:
        pool.set_allocation(CPU, "outsider", totals[CPU] // 2)
    m = SwapManager(pool, headroom=headroom, saturation=saturation,
                    policy=StabilityPolicy(**policy) if policy else None)
    m.COLUMNS_FROM = 0 if columns else 10**9
    for t in tasks:
        m.add_task(t)
    return m


def _state(m: SwapManager, result):
    pool = m.pool
    allocations = [list(pool.allocations(r).items()) for r in RESOURCES]
    log = [(x.kind, x.resource, x.task, x.old, x.new, x.reason, x.source) for x in m.swap_log]
    low = dict(m.policy._low_for) if m.policy else None
    return (result.changes, result.swaps, result.shortfalls, list(result.demands.items()),
            allocations, log, low, {n: (h.seen, h.age) for n, h in m.admission_holds.items()})


def _tick(m: SwapManager, tick):
    fc, obs, rel, judged, holds = tick
    m._judged = set(judged)
    for name, grant in holds:
        m.hold_admission(name, grant, samples=2, ticks=3)
    try:
        return _state(m, m.proactive_allocation(fc, obs, rel))
    except Exception as err:  # both must refuse alike
        return type(err), str(err)


@pytest.mark.parametrize("seed", range(400))
def test_columns_allocate_as_the_loop_does(seed):
    sc = _scenario(seed)
    loop, cols = _manager(sc, False), _manager(sc, True)
    assert cols._columns() is not None and loop._columns() is None
    for i, tick in enumerate(sc[5]):
        expected = _tick(loop, tick)
        got = _tick(cols, tick)
        assert got == expected, f"seed {seed}, tick {i}"


def test_columns_step_aside_for_what_they_do_not_model():
    """A policy of another kind, or a subclass that changes the demand, runs the loop."""
    pool = ResourcePool()
    pool.register_resource(CPU, 100)

    class Other:
        def adjust(self, r, total, demands, held):
            return dict(demands)

    m = SwapManager(pool, policy=Other())
    m.COLUMNS_FROM = 0
    m.add_task(ManagedTask("a", Priority.NORMAL, {CPU: Limits()}))
    assert m._columns() is None
    m.policy = StabilityPolicy()
    assert m._columns() is not None

    class Mine(SwapManager):
        def demand(self, task, resource, forecast, observed=None):
            return 1

    mine = Mine(pool)
    mine.COLUMNS_FROM = 0
    mine.add_task(ManagedTask("a", Priority.NORMAL, {CPU: Limits()}))
    assert mine._columns() is None


@pytest.mark.parametrize("seed", range(60))
def test_observed_demands_are_observed_demand_of_each_task(seed):
    """SwapManager.observed_demands (judged by use: no kernel flag) against observed_demand
    called task by task: the same values and the same judged set."""
    rng = random.Random(seed)
    n = rng.randint(1, 120)

    sat = rng.choice((0.9, 1.0, 0.0, 1))
    limits = {f"t{i}": Limits(0, rng.choice((None, 500, 20))) for i in range(n)}
    held = {f"t{i}": rng.choice((0, 0, 10, 100, 1000)) for i in range(n)}
    used = {f"t{i}": rng.choice((0.0, 9.0, 10.0, 95.0, 100.0, 1e9, math.nan, math.inf,
                                 rng.random() * 1000)) for i in range(n)}
    if rng.random() < 0.2:
        used[f"t{rng.randrange(n)}"] = 7  # an int: the loop's path
    results = []
    for one_by_one in (True, False):
        pool = ResourcePool()
        pool.register_resource(CPU, 10**6)
        m = SwapManager(pool, saturation=sat)
        for name, units in held.items():
            m.add_task(ManagedTask(name, Priority.NORMAL, {CPU: limits[name]}))
            if units:
                m.pool.set_allocation(CPU, name, units)
        if one_by_one:
            out = {name: m.observed_demand(name, CPU, u) for name, u in used.items()}
        else:
            out = m.observed_demands(CPU, used)
        results.append(([(k, repr(v)) for k, v in out.items()], set(m._judged)))
    assert results[0] == results[1]
