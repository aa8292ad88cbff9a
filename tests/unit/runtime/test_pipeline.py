"""The tick pipeline (runtime/pipeline.py) on a fake host: drivers that follow the capability
classes of host/driver.py (Reads, Enforces, KeepsFloors), with no kernel, BPF or daemon."""
from __future__ import annotations

import pytest

from rswap_ebpf.host.cgroup import TaskCgroup
from rswap_ebpf.host.driver import Driver, Enforces, KeepsFloors, Reads
from rswap_ebpf.model.limits import Limits, Priority
from rswap_ebpf.model.resources import ResourcePool, ResourceType
from rswap_ebpf.predict.profile import TaskProfiler
from rswap_ebpf.predict.registry import make_forecaster
from rswap_ebpf.runtime import pipeline
from rswap_ebpf.swap.manager import ManagedTask, SwapManager

CPU = ResourceType.PROCESSOR_CYCLES
IOPS = ResourceType.STORAGE_IOPS


class FakeCpu(Driver, Reads, Enforces):
    """Reads the next row of ``usage`` each tick; records every apply()."""

    resource = CPU

    def __init__(self, usage):
        self.usage = list(usage)
        self.applied: list[tuple[str, int]] = []

    def total(self) -> int:
        return 2000

    def measure(self, tasks):
        row = self.usage.pop(0)
        return {n: float(row[n]) for n in tasks if n in row}

    def plan(self, cg, units):
        return []

    def apply(self, cg, units):
        self.applied.append((cg.name, units))
        return []


class ReadOnly(Driver, Reads):
    """Senses only (a monitor): has an apply() but does not declare Enforces."""

    resource = IOPS

    def total(self) -> int:
        return 1000

    def measure(self, tasks):
        return {n: 100.0 for n in tasks}

    def apply(self, cg, units):
        raise AssertionError("a driver that does not declare Enforces was written")


class FlooredCpu(FakeCpu, KeepsFloors):
    def __init__(self, usage):
        super().__init__(usage)
        self.floors: dict[str, int] = {}

    def set_floor(self, task, units):
        old = self.floors.get(task, 0)
        if units:
            self.floors[task] = units
        else:
            self.floors.pop(task, None)
        return old != self.floors.get(task, 0)


def _host(drivers, tasks, window=1, critical_floor=0.0):
    pool = ResourcePool()
    for d in drivers:
        pool.register_resource(d.resource, d.total())
    mgr = SwapManager(pool, headroom=0.2)
    for name, prio, limits in tasks:
        mgr.add_task(ManagedTask(name, prio, limits))
    profiler = TaskProfiler(lambda t, r: make_forecaster("last_value", scale=pool.total(r)))
    by_r = {d.resource: d for d in drivers}
    pipe = pipeline.Pipeline(pipeline.Observe(by_r, pool, mgr),
                             pipeline.ProfileForecast(profiler, pool, by_r, window, critical_floor),
                             pipeline.Allocate(mgr), pipeline.Enforce(by_r, pool, mgr))
    cgroups = {name: TaskCgroup(name, name, {}, True) for name, _, _ in tasks}
    prios = {name: prio.name.lower() for name, prio, _ in tasks}
    return pipe, pool, cgroups, prios


TWO = [("web", Priority.CRITICAL, {CPU: Limits(100, None)}),
       ("batch", Priority.BATCH, {CPU: Limits(100, None)})]


def test_a_critical_burst_is_observed_forecast_allocated_and_enforced():
    # web idles while batch takes the pool, then bursts to 1.5 CPUs: batch gives way.
    usage = [{"web": 150, "batch": 1700}] * 3 + [{"web": 1500, "batch": 400}] * 3
    cpu = FakeCpu(usage)
    pipe, pool, cgroups, prios = _host([cpu], TWO)
    reports = [pipe.tick(i, cgroups, prios) for i in range(1, 7)]
    last = reports[-1]
    assert last.observation.usage["web"][CPU] == 1500.0
    assert last.forecast.peak["web"][CPU] == pytest.approx(1500)
    # the critical task holds its burst plus headroom, within the pool, batch the rest
    assert pool.allocation(CPU, "web") >= 1500
    assert pool.allocation(CPU, "web") + pool.allocation(CPU, "batch") <= 2000
    # ... and what the pool says is what the driver was told last, for both
    last_applied = dict(cpu.applied)
    assert last_applied["web"] == pool.allocation(CPU, "web")
    assert last_applied["batch"] == pool.allocation(CPU, "batch")
    # the report carries the stages' data
    assert {(w[0], w[2]) for w in last.enforced.written} <= set(cpu.applied)
    assert any(ch.task == "web" for r in reports[3:] for ch in r.result.changes)


def test_a_driver_that_does_not_enforce_is_read_but_never_written():
    cpu = FakeCpu([{"web": 300, "batch": 300}] * 3)
    ro = ReadOnly()
    tasks = [(n, p, {**lim, IOPS: Limits(10, None)}) for n, p, lim in TWO]
    pipe, pool, cgroups, prios = _host([cpu, ro], tasks)
    for i in range(1, 4):
        rep = pipe.tick(i, cgroups, prios)
    assert rep.observation.usage["web"][IOPS] == 100.0       # read...
    assert pool.allocation(IOPS, "web") > 0                   # ...allocated...
    assert all(r != IOPS for _, r, _ in rep.enforced.written)  # ...never written
    assert cpu.applied


def test_tasks_left_out_after_observe_are_neither_forecast_nor_written():
    cpu = FakeCpu([{"web": 300, "batch": 300}] * 2)
    pipe, pool, cgroups, prios = _host([cpu], TWO)
    rep = pipe.tick(1, cgroups, prios, between=lambda obs: ["batch"])
    assert "batch" in rep.usage                    # it was read this tick...
    assert "batch" not in rep.forecast.peak         # ...but not forecast
    assert "batch" not in {n for n, _ in cpu.applied}


def test_a_critical_floor_goes_to_a_driver_that_keeps_floors_not_into_the_units():
    # a season of 8: six idle ticks, two of burst; the floor is the season's 0.9 quantile
    cpu = FlooredCpu([])
    pipe, pool, cgroups, prios = _host([cpu], TWO, window=1, critical_floor=0.9)
    profiler = pipe.forecast.profiler
    from rswap_ebpf.predict.forecasters import SeasonalNaive

    profiler.profile("web", CPU).forecaster = SeasonalNaive(period=8)
    for _ in range(2):
        for y in (100,) * 6 + (900,) * 2:
            profiler.update_prediction("web", CPU, y)
    tf = pipe.forecast.for_task("web", "critical")
    assert tf.peak[CPU] == pytest.approx(100)      # the units follow the window...
    assert tf.floors[CPU] == pytest.approx(900)    # ...the floor goes to the driver
    changed = pipe.enforce.keep_floors({("web", CPU): tf.floors[CPU]}, {"web", "batch"})
    assert changed == {("web", CPU)} and cpu.floors == {"web": 1080}  # 900 + 20 % headroom
    pipe.enforce.keep_floors({}, {"batch"})        # web left: its floor goes with it
    assert cpu.floors == {}


def test_observation_without_drops_only_the_named_tasks():
    obs = pipeline.Observation(1, {"a": None, "b": None}, {"a": "normal", "b": "batch"},
                               {"a": {CPU: 1.0}, "b": {CPU: 2.0}},
                               {"a": {CPU: 1.0}, "b": {CPU: 2.0}})
    assert obs.without([]) is obs
    kept = obs.without(["b"])
    assert list(kept.tasks) == ["a"] and list(kept.observed) == ["a"] and kept.tick == 1


def test_the_slot_clock_counts_ticks_of_the_wall_clock():
    clock = pipeline.SlotClock(0.5)
    assert clock.slots(100.0) == 1                      # the first observation
    assert clock.slots(100.52) == 1                     # on time, a little late
    assert clock.slots(102.03) == 3                     # 1.5 s late: three slots
    assert clock.slots(102.05) == 0                     # in the slot just filled
    assert clock.slots(102.5) == 1
    # jitter never accumulates: over many ticks, late by up to 0.2 s each, the slots add up to
    # the intervals elapsed
    t, total = 102.5, 0
    for i in range(1000):
        t += 0.5 + (0.2 if i % 3 == 0 else -0.1)
        total += clock.slots(t)
    assert total == round((t - 102.5) / 0.5)
    with pytest.raises(ValueError):
        pipeline.SlotClock(0)


def test_a_late_tick_is_learnt_once_per_slot_it_covers():
    usage = [{"web": 100, "batch": 500}] * 4
    cpu = FakeCpu(usage)
    pipe, pool, cgroups, prios = _host([cpu], TWO)
    profiler = pipe.forecast.profiler
    pipe.tick(1, cgroups, prios)
    assert len(profiler.profiles[("web", CPU)].history) == 1
    pipe.tick(2, cgroups, prios, slots=3)               # came two intervals late
    assert len(profiler.profiles[("web", CPU)].history) == 4
    rep = pipe.tick(3, cgroups, prios, slots=0)         # early: its slot is learnt already
    assert len(profiler.profiles[("web", CPU)].history) == 4
    assert rep.observation.slots == 0 and rep.forecast.peak["web"][CPU] == pytest.approx(100)
