"""One tick as four stages: Observe -> Forecast -> Allocate -> Enforce.

* **Observe**: every driver that :class:`~rswap_ebpf.host.driver.Reads` measures each task's use
  over the last tick, says whether rswap's own cap held it down (``censored``) and by how much
  (``withheld``); the swap manager turns that into the demand to learn from.
* **Forecast**: each task's profile learns the demand and forecasts the next ``window`` ticks.
* **Allocate**: the swap manager hands out the pool from the forecasts (tiers, floors, swaps).
* **Enforce**: every driver that :class:`~rswap_ebpf.host.driver.Enforces` writes the changed
  units; drivers that keep floors or settle a tier do so after.

The stages know nothing of processes, locks or journals, so the same pipeline runs on the host
(:class:`~rswap_ebpf.runtime.daemon.Daemon`) and on a recorded trace (``offline/replay.py``).
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rswap_ebpf.errors import EnforceError, RswapError
from rswap_ebpf.host.cgroup import TaskCgroup
from rswap_ebpf.host.driver import Driver, Enforces, KeepsFloors, Reads, ReportsDrops, Settles
from rswap_ebpf.model.resources import Resource, ResourcePool
from rswap_ebpf.model.stats import quantile
from rswap_ebpf.predict.profile import TaskProfiler
from rswap_ebpf.swap.manager import AllocationResult, SwapManager

log = logging.getLogger(__name__)

PerTask = dict[str, dict[Resource, float]]


class SlotClock:
    """Counts the ticks of the wall clock each observation stands for.

    Seasonal models count phase in samples.  A tick that comes late (a loaded host, a slow
    driver) measures a rate over several intervals but is one sample, and the daemon does not
    catch up: each late tick moves every season's phase by the ticks it skipped, so a burst
    that repeats every 120 s by the clock comes back 199-241 samples apart in a 240-tick season.
    The clock keeps a grid of ``interval``-wide slots from the first observation: each
    observation fills the slots up to the grid point nearest to it, so profiles learn a late
    tick's rate once per slot it covered, and a tick that falls in a slot already filled is not
    learnt again.  The grid moves only in whole slots, so jitter never accumulates.
    """

    def __init__(self, interval: float):
        if not interval > 0:
            raise ValueError("interval must be positive")
        self.interval = float(interval)
        self._at: float | None = None

    def slots(self, now: float) -> int:
        """Slots from the last observation's to ``now``'s (1 for the first observation)."""
        if self._at is None:
            self._at = now
            return 1
        n = max(0, math.floor((now - self._at) / self.interval + 0.5))
        self._at += n * self.interval
        return n


@dataclass(frozen=True)
class Observation:
    """What the drivers read this tick, per task: ``usage`` as measured, ``observed`` the demand
    the manager learns from (use, or more where the cap held the task down).  ``slots``: how
    many ticks of the wall clock it stands for (:class:`SlotClock`): 1 on time, more for a late
    tick, 0 for one that came in the slot the previous tick already filled."""

    tick: int
    tasks: Mapping[str, TaskCgroup]
    priorities: Mapping[str, str]
    usage: PerTask
    observed: PerTask
    slots: int = 1

    def without(self, gone: Iterable[str]) -> Observation:
        gone = set(gone)
        if not gone:
            return self
        keep = [n for n in self.tasks if n not in gone]
        return Observation(self.tick, {n: self.tasks[n] for n in keep},
                           {n: self.priorities[n] for n in keep if n in self.priorities},
                           {n: self.usage[n] for n in keep}, {n: self.observed[n] for n in keep},
                           self.slots)


@dataclass(frozen=True)
class TaskForecast:
    """One task's forecast: ``peak`` over the window (what allocation plans for), ``next`` the
    next tick's, the model behind each, and a critical task's seasonal ``floors`` for drivers
    that keep them under the limit instead of as units."""

    peak: dict[Resource, float] = field(default_factory=dict)
    next: dict[Resource, float] = field(default_factory=dict)
    models: dict[Resource, str] = field(default_factory=dict)
    floors: dict[Resource, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Forecasts:
    peak: PerTask
    next: PerTask
    models: dict[str, dict[Resource, str]]
    releases: dict[str, dict[Resource, float]]
    floors: dict[tuple[str, Resource], float]


@dataclass(frozen=True)
class EnforceReport:
    written: tuple[tuple[str, Resource, int], ...] = ()
    #: tasks whose cgroup went while their units were written (reaped next tick)
    vanished: tuple[str, ...] = ()


@dataclass(frozen=True)
class TickReport:
    tick: int
    duration_s: float
    result: AllocationResult
    usage: PerTask
    forecasts: PerTask
    observation: Observation | None = None
    forecast: Forecasts | None = None
    enforced: EnforceReport | None = None


class Observe:
    def __init__(self, drivers: Mapping[Resource, Driver], pool: ResourcePool,
                 manager: SwapManager,
                 on_drops: Callable[[Resource, dict[str, int]], None] | None = None):
        self.drivers, self.pool, self.manager, self.on_drops = drivers, pool, manager, on_drops

    def __call__(self, tick: int, tasks: Mapping[str, TaskCgroup],
                 priorities: Mapping[str, str], slots: int = 1) -> Observation:
        usage: PerTask = {n: {} for n in tasks}
        observed: PerTask = {n: {} for n in tasks}
        for r, d in self.drivers.items():
            self.pool.monitor_resource(r)
            if not isinstance(d, Reads):
                continue
            measured = d.measure(tasks)
            if isinstance(d, ReportsDrops) and self.on_drops is not None and d.last_dropped:
                self.on_drops(r, d.last_dropped)
            seen = self.manager.observed_demands(r, measured, d.censored(tasks),
                                                 d.withheld(tasks))
            for name, units in measured.items():
                usage.setdefault(name, {})[r] = units
                observed.setdefault(name, {})[r] = seen[name]
        return Observation(tick, tasks, priorities, usage, observed, slots)


class ProfileForecast:
    """The profiles learn each observed demand and forecast the window (``daemon.window``).

    Between bursts a critical task's forecast falls to its idle level, and the tick that raises it
    can land after the burst began: the first requests are throttled.  So a critical task keeps
    the ``critical_floor`` quantile of its forecast over a whole season (the forecaster's period,
    or ``critical_season`` ticks): a service busy a quarter of the time keeps about its burst
    level, one that bursts rarely keeps little more than idle.  Where the resource's driver
    :class:`~rswap_ebpf.host.driver.KeepsFloors` the floor goes to it instead of into the units.
    """

    def __init__(self, profiler: TaskProfiler, pool: ResourcePool,
                 drivers: Mapping[Resource, Driver], window: int, critical_floor: float = 0.0,
                 critical_season: int = 0):
        self.profiler, self.pool, self.drivers = profiler, pool, drivers
        self.window = window
        self.critical_floor = critical_floor
        self.critical_season = critical_season

    def __call__(self, obs: Observation) -> Forecasts:
        peak: PerTask = {}
        nxt: PerTask = {}
        models: dict[str, dict[Resource, str]] = {}
        releases: dict[str, dict[Resource, float]] = {}
        floors: dict[tuple[str, Resource], float] = {}
        self.profiler.update_many(obs.observed, obs.slots)
        plain = not self.critical_floor
        prios = obs.priorities
        kept = self._kept()
        for name in obs.observed:
            if plain or prios.get(name, "normal") != "critical":
                peak[name], nxt[name], models[name], releases[name] = \
                    self.profiler.forecast_peaks(name, self.window)
            else:
                tf = self.for_task(name, "critical", kept)
                peak[name], nxt[name], models[name] = tf.peak, tf.next, tf.models
                floors.update({(name, r): v for r, v in tf.floors.items()})
                releases[name] = self.profiler.releases(name)
        try:
            self.profiler.flush(time.time())
        except RswapError as err:  # a full disk must not stop allocation
            log.warning("%s", err)
        return Forecasts(peak, nxt, models, releases, floors)

    def _kept(self) -> tuple[list[Resource], set[Resource]]:
        """The pool's resources, and those whose driver keeps floors: looked up once a tick,
        not once per critical task."""
        return (self.pool.types(),
                {r for r, d in self.drivers.items() if isinstance(d, KeepsFloors)})

    def for_task(self, name: str, priority: str,
                 kept: tuple[list[Resource], set[Resource]] | None = None) -> TaskForecast:
        if priority != "critical" or not self.critical_floor:
            return TaskForecast(*self.profiler.forecast_peaks(name, self.window)[:3])
        out = TaskForecast()
        types, keeps = kept or self._kept()
        mine = self.profiler.profiles_of(name)
        how = self.critical_floor
        for r in types:
            prof = mine.get(r)
            if prof is None:
                continue
            season = self.critical_season or getattr(prof.forecaster, "period", 0) or self.window
            series = prof.forecast(max(self.window, int(season)))
            # a quantile of the season ("peak" reads as 0.0 here)
            floor = 0.0 if how == "peak" else quantile(series, float(how))
            out.next[r] = series[0]
            out.models[r] = prof.model_name
            if r in keeps:
                # CPU: the floor is kept under the task's quota and weight, not as units held
                out.peak[r] = max(series[:self.window])
                out.floors[r] = floor if math.isfinite(floor) else 0.0
            else:
                out.peak[r] = max(max(series[:self.window]), floor)
        return out


class Allocate:
    def __init__(self, manager: SwapManager):
        self.manager = manager

    def __call__(self, obs: Observation, fc: Forecasts) -> AllocationResult:
        return self.manager.proactive_allocation(fc.peak, obs.observed, fc.releases)


class Enforce:
    """Write the tick's changed units through the drivers that enforce; then floors, settle."""

    def __init__(self, drivers: Mapping[Resource, Driver], pool: ResourcePool,
                 manager: SwapManager, say: Callable[[str], None] = lambda text: None):
        self.drivers, self.pool, self.manager, self.say = drivers, pool, manager, say
        #: resource -> cores a driver's settle() keeps for the critical tier now (said on change)
        self.isolated: dict[Resource, int] = {}

    def __call__(self, result: AllocationResult, fc: Forecasts,
                 live: Mapping[str, TaskCgroup]) -> EnforceReport:
        floored = self.keep_floors(fc.floors, set(live))
        for ch in result.changes:
            floored.discard((ch.task, ch.resource))
        todo = [(ch.task, ch.resource, ch.new) for ch in result.changes]
        todo += [(n, r, self.pool.allocation(r, n)) for n, r in sorted(floored, key=str)]
        written, vanished = [], []
        for task, res, units in todo:
            cg, driver = live.get(task), self.drivers.get(res)
            if cg is None or not isinstance(driver, Enforces):
                continue
            try:
                driver.apply(cg, units)
                written.append((task, res, units))
            except EnforceError as err:  # its cgroup vanished mid-tick: reaped next tick
                if cg.exists():
                    raise
                log.info("task %s: cgroup gone while applying (%s)", task, err)
                vanished.append(task)
        self.settle(live)
        return EnforceReport(tuple(written), tuple(vanished))

    def keep_floors(self, floors: Mapping[tuple[str, Resource], float],
                    live: set[str]) -> set[tuple[str, Resource]]:
        """Hand this tick's critical floors (plus headroom, within the task's limits) to the
        drivers that keep them; the (task, resource) pairs whose floor changed."""
        changed = set()
        for r, drv in self.drivers.items():
            if not isinstance(drv, KeepsFloors):
                continue
            for name in [n for n in drv.floors if (n, r) not in floors or n not in live]:
                drv.set_floor(name, 0)  # gone, or no longer floored: its limit follows its units
            for (name, fr), floor in floors.items():
                if fr != r or name not in live:
                    continue
                lim = self.manager.tasks[name].limit(r)
                units = lim.clamp(math.ceil(max(0.0, floor) * (1 + self.manager.headroom)))
                if drv.set_floor(name, units):
                    changed.add((name, r))
        return changed

    def settle(self, live: Mapping[str, TaskCgroup]) -> None:
        """Drivers that act on a whole tier after the tick's units are written (CpuDriver.settle:
        lower tiers' cpusets leave a critical burst its cores) see every live task's units."""
        for r, drv in self.drivers.items():
            if not isinstance(drv, Settles):
                continue
            state = drv.settle(live, {n: self.pool.allocation(r, n) for n in live})
            cores = getattr(state, "cores", None)
            if cores is not None and cores != self.isolated.get(r, 0):
                self.say(f"rswap: {r.key} isolation: {cores} core(s) kept for the critical "
                         f"tier (lower tiers on {sorted(state.lower_cpus)})")
                self.isolated[r] = cores


class Pipeline:
    """The four stages in order; ``between`` runs after Observe (the daemon reaps exited tasks
    there) and names the tasks to leave out of the rest of the tick."""

    def __init__(self, observe: Observe, forecast: Callable[[Observation], Forecasts],
                 allocate: Allocate, enforce: Enforce):
        self.observe, self.forecast, self.allocate, self.enforce = \
            observe, forecast, allocate, enforce

    def tick(self, tick: int, tasks: Mapping[str, TaskCgroup], priorities: Mapping[str, str],
             between: Callable[[Observation], Iterable[str]] | None = None,
             started: float | None = None, slots: int = 1) -> TickReport:
        t0 = time.perf_counter() if started is None else started
        seen = obs = self.observe(tick, tasks, priorities, slots)
        if between is not None:
            obs = obs.without(between(obs))
        fc = self.forecast(obs)
        result = self.allocate(obs, fc)
        managed = self.allocate.manager.tasks
        live = {n: cg for n, cg in obs.tasks.items() if n in managed}
        enforced = self.enforce(result, fc, live)
        return TickReport(tick, time.perf_counter() - t0, result, seen.usage, fc.peak,
                          obs, fc, enforced)


def build(drivers: Mapping[Resource, Driver], pool: ResourcePool, manager: SwapManager,
          profiler: TaskProfiler, daemon_config: Any, say: Callable[[str], None],
          on_drops: Callable[[Resource, dict[str, int]], None] | None = None) -> Pipeline:
    """The daemon's pipeline over ``drivers`` (shared, not copied: drivers may come later)."""
    dc = daemon_config
    return Pipeline(Observe(drivers, pool, manager, on_drops),
                    ProfileForecast(profiler, pool, drivers, dc.window, dc.critical_floor,
                                    dc.critical_season),
                    Allocate(manager), Enforce(drivers, pool, manager, say))
