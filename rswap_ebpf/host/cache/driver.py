"""Cache: L3 ways per task through resctrl (CAT / AMD L3 QoS), sensed by CMT occupancy.

Usage in ways = the group's ``llc_occupancy`` over the bytes one way holds (the default group's
``size`` over the number of ways), judged per L3 domain and the largest taken: a mask applies in
every domain, and a task on one socket of a two-socket host fills its share there while the other
socket's L3 holds none of it (an average over domains would read half).  Occupancy cannot exceed the ways a task's mask gives it, so it
hides how many more the task wants.  Per-task cache misses from the PMU collector are the second
signal: a task that fills its ways *and* misses more than its calm baseline (its miss rate, a
moving average over the ticks it was not pressed) is reported censored, so the swap manager grows
the demand the profile learns and the Cache forecast rises before occupancy could show it; a task
that fills its ways at its usual miss rate is not (more ways would not help it).  Without CMT but
with a PMU the sample is the ways held, judged the same way.  In per-tier mode misses also split a
tier's occupancy between its tasks (by allocation when there is no PMU).

The cache and memory-bandwidth drivers share one :class:`ResctrlEnforcer` (one group per task
carries both the ``L3`` and the ``MB`` line).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from rswap_ebpf.host.cgroup import TaskCgroup, Write
from rswap_ebpf.host.cache.masks import exclusive_region
from rswap_ebpf.host.cache.resctrl import ResctrlEnforcer, ensure_mounted, parse_schemata, read_info
from rswap_ebpf.errors import FeatureMissing
from rswap_ebpf.model.resources import ResourceType
from rswap_ebpf.host.cache.monitor import MbmCollector
from rswap_ebpf.host.driver import DriverContext, ResourceDriver

log = logging.getLogger(__name__)

_SHARED: dict[int, "ResctrlShared"] = {}


class ResctrlShared:
    """One enforcer and one monitor for every resctrl-backed driver of a daemon."""

    def __init__(self, ctx: DriverContext, root: str | None = None, fs=None):
        opts = _options(ctx, ResourceType.CACHE)
        if not ctx.dry_run:
            root = ensure_mounted(ctx.journal, root)
        self.enforcer = ResctrlEnforcer(ctx.journal, root=root, fs=fs,
                                        isolate_default=bool(opts.get("isolate_default", True)),
                                        dry_run=ctx.dry_run)
        self.info = read_info(self.enforcer.root, self.enforcer.fs)
        self.tasks = {t.name: t.priority.name.lower() for t in getattr(ctx.config, "tasks", ())}
        self.monitor: MbmCollector | None = None
        self.monitor_missing: FeatureMissing | None = None
        self._opened = False
        self._users = 0
        self._delta = None
        self._tick_key: object = None

    def open(self) -> None:
        self._users += 1
        if self._opened:
            return
        self.enforcer.open(self.tasks, mount=False)
        groups = {t: g for t, g in self.enforcer.group_of_task.items()}
        try:
            self.monitor = MbmCollector(groups, self.enforcer.root, self.enforcer.fs).open()
        except FeatureMissing as err:
            self.monitor_missing = err
            log.warning("%s", err)
        self._opened = True

    def sample(self, tick_key: object):
        """One drain per tick, shared by the cache and membw drivers.

        ``tick_key`` is the task mapping the daemon passes to every driver in one tick: the same
        object means the same tick.
        """
        if self.monitor is None:
            return None
        if tick_key is not self._tick_key:
            self._delta = self.monitor.drain()
            self._tick_key = tick_key
        return self._delta

    def place(self, tasks: Mapping[str, TaskCgroup]) -> None:
        for name, cg in tasks.items():
            if name in self.enforcer.group_of_task:
                self.enforcer.place(name, cg.pids())

    def way_bytes(self) -> float:
        """Bytes one L3 way holds in the first domain (see :meth:`way_bytes_by_domain`)."""
        per = self.way_bytes_by_domain()
        return next(iter(per.values()), 0.0)

    def way_bytes_by_domain(self) -> dict[int, float]:
        """Bytes one L3 way holds in each domain, from the default group's ``size``; under CDP
        from its ``L3DATA`` line (what a task's data occupies)."""
        fs, root = self.enforcer.fs, self.enforcer.root
        try:
            sizes = _l3_line(parse_schemata(fs.read(os.path.join(root, "size"))))
            masks = _l3_line(parse_schemata(fs.read(os.path.join(root, "schemata"))))
            return {d: int(sizes[d]) / max(1, bin(int(masks[d], 16)).count("1"))
                    for d in sorted(sizes) if d in masks}
        except (OSError, KeyError, ValueError):
            return {}

    def close(self) -> None:
        self._users -= 1
        if self._users > 0:
            return
        if self.monitor is not None:
            self.monitor.close()
        self._opened = False


def _l3_line(parsed: Mapping[str, dict[int, str]]) -> dict[int, str]:
    for name in ("L3", "L3DATA", "L3CODE"):
        if parsed.get(name):
            return parsed[name]
    return {}


def shared(ctx: DriverContext) -> ResctrlShared:
    key = id(ctx.journal)
    s = _SHARED.get(key)
    if s is None:
        s = _SHARED[key] = ResctrlShared(ctx)
    return s


def _options(ctx: DriverContext, r: ResourceType) -> dict:
    return dict(getattr(ctx.config, "options", {}).get(r, {}))


#: misses/s this far above a task's calm baseline, while it fills its ways, = it wants more ways
MISS_RISE = 0.25
#: occupancy at this share of the ways held = the task fills them
FILL = 0.9
#: weight of a new calm tick in the baseline's moving average
BASELINE_ALPHA = 0.2


class CacheDriver(ResourceDriver):
    """Ways per task: CAT masks written to ``schemata``, occupancy read from ``mon_data``."""

    resource = ResourceType.CACHE

    def __init__(self, rs: ResctrlShared, pmu=None):
        if not rs.info.has_l3:
            raise FeatureMissing("resctrl L3 allocation", "info/L3 (and info/L3CODE) is missing",
                                 "the CPU has no cache allocation (Intel CAT / AMD L3 QoS)")
        self.rs = rs
        self.pmu = pmu
        self.last_misses: dict[str, int] = {}
        self.miss_rate: dict[str, float] = {}       # misses/s over the last tick
        self.miss_baseline: dict[str, float] = {}   # misses/s when not pressed (moving average)
        self.pressed: dict[str, bool] = {}          # this tick: fills its ways and misses more

    def total(self) -> int:
        """Ways a task can be given for itself: those outside ``shareable_bits``."""
        lo, hi = exclusive_region(self.rs.info)
        return hi - lo

    def open(self) -> None:
        self.rs.open()
        if self.pmu is not None:
            try:
                self.pmu.open()
            except FeatureMissing as err:  # e.g. perf_event_paranoid: enforce without misses
                log.warning("cache misses not sensed: %s", err)
                self.pmu = None
            else:
                choice = getattr(self.pmu, "choice", None)
                if choice is not None:  # what "misses" means here: L3, LLC, or L2 on old AMD
                    log.info("cache misses counted as %s", choice.label)

    def measure(self, tasks: Mapping[str, TaskCgroup]) -> dict[str, float]:
        """Ways each task held; {} (not zeros) when the host cannot monitor occupancy."""
        self.rs.place(tasks)
        if self.pmu is not None:
            delta = self.pmu.drain()
            self.last_misses = {n: _misses(delta, cg) for n, cg in tasks.items()}
            secs = delta.interval_ns / 1e9
            self.miss_rate = {n: m / secs for n, m in self.last_misses.items()} if secs > 0 else {}
        sample = self.rs.sample(tasks)
        way = self.rs.way_bytes_by_domain()
        if sample is None or not way or min(way.values()) <= 0:
            if not self.miss_rate:
                return {}
            # No occupancy monitor: the ways held, with misses telling whether they are enough.
            held = {n: float(self.rs.enforcer.ways.get(n, 0)) for n in tasks if n in self.miss_rate}
            self._judge(held)
            return held
        out = {}
        for name in tasks:
            held = sample.occupancy_by_domain.get(name)
            if not held:
                continue
            share = _tier_share(self.rs.enforcer, name, self.rs.enforcer.ways, self.last_misses)
            # The domain where it holds the most ways: a mask's ways apply in every domain, so
            # that is the domain where the mask binds.
            out[name] = max(b * share / way[d] for d, b in held.items() if d in way) \
                if any(d in way for d in held) else 0.0
        self._judge(out)
        return out

    def _judge(self, used: Mapping[str, float]) -> None:
        """Per task with a miss rate: pressed (fills its ways and misses above its baseline)?"""
        self.pressed = {}
        for name, rate in self.miss_rate.items():
            held = self.rs.enforcer.ways.get(name, 0)
            fills = held > 0 and used.get(name, 0.0) >= FILL * held
            base = self.miss_baseline.get(name)
            if base is not None and fills and rate > (1 + MISS_RISE) * base:
                self.pressed[name] = True   # the baseline keeps its calm value meanwhile
                continue
            self.pressed[name] = False
            self.miss_baseline[name] = rate if base is None else (
                (1 - BASELINE_ALPHA) * base + BASELINE_ALPHA * rate)

    def censored(self, tasks: Mapping[str, TaskCgroup]) -> dict[str, bool]:
        """Misses decide for the tasks the PMU measured; the others by occupancy alone."""
        return {n: p for n, p in self.pressed.items() if n in tasks}

    def plan(self, cg: TaskCgroup, units: int) -> list[Write]:
        return self.rs.enforcer.plan(ways={cg.name: units})

    def apply(self, cg: TaskCgroup, units: int) -> list[Write]:
        return self.rs.enforcer.apply(ways={cg.name: units})

    def close(self) -> None:
        if self.pmu is not None:
            self.pmu.close()
        self.rs.close()


def _misses(delta, cg: TaskCgroup) -> int:
    """The task's misses: by its cgroup ids, else by its processes (a task whose cgroup2 id
    BPF does not see, e.g. pids adopted on a host whose cgroup2 has no directory for them)."""
    by_cgroup = sum(delta.cgroup_misses.get(i, 0) for i in cg.cgroup_ids())
    if by_cgroup:
        return by_cgroup
    return sum(delta.task[p].misses for p in cg.pids() if p in delta.task)


def _tier_share(enf: ResctrlEnforcer, task: str, alloc: Mapping[str, int],
                weights: Mapping[str, int]) -> float:
    """The task's part of its group's counters: 1 per task; in per-tier mode split by weight."""
    group = enf.group_of_task[task]
    members = [t for t, g in enf.group_of_task.items() if g == group]
    if len(members) == 1:
        return 1.0
    w = {t: weights.get(t, 0) for t in members}
    if not sum(w.values()):
        w = {t: alloc.get(t, 0) for t in members}
    if not sum(w.values()):
        return 1.0 / len(members)
    return w[task] / sum(w.values())


def make(ctx: DriverContext) -> CacheDriver:
    pmu = None
    try:
        from rswap_ebpf.host.cache.pmu import PmuCollector, pmu_available

        if pmu_available():
            pmu = PmuCollector()
    except FeatureMissing as err:
        log.info("%s", err)
    return CacheDriver(shared(ctx), pmu)
