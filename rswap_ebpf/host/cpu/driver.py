"""CPU: sched_switch BPF accounting + cgroup CPU quota (v2 ``cpu.max`` or v1 CFS quota)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from rswap_ebpf.host.cgroup import (CgroupMounts, CpuShape, FileApplier, TaskCgroup, ThrottleStats,
                              Write, cpu_writer, online_cpus)
from rswap_ebpf.errors import FeatureMissing
from rswap_ebpf.model.resources import ResourceType
from rswap_ebpf.host.cpu.collector import CpuCollector
from rswap_ebpf.host.driver import (DriverContext, KeepsFloors, ReportsDrops, ResourceDriver,
                                    Settles, ShapesByTier)


#: What each tier adds to its quota (enforce.cgroup.CpuShape): a critical task keeps unused quota
#: for a burst's edge and outweighs the others 8:1 per unit.  ``[resources.cpu]`` critical_burst,
#: critical_weight and batch_idle change them.  batch_idle (SCHED_IDLE batch: preempted as soon
#: as anything wakes) is off by default: on a shared host it also loses to every unmanaged
#: process, nice 19 included, so its minimum would no longer mean anything (README, co-location).
TIER_SHAPES = {"critical": CpuShape(burst=True, weight=8.0), "normal": CpuShape(),
               "batch": CpuShape()}


def tier_shapes(options: Mapping[str, object]) -> dict[str, CpuShape]:
    crit, batch = TIER_SHAPES["critical"], TIER_SHAPES["batch"]
    return {"critical": CpuShape(burst=bool(options.get("critical_burst", crit.burst)),
                                 weight=float(options.get("critical_weight", crit.weight))),
            "normal": TIER_SHAPES["normal"],
            "batch": CpuShape(idle=bool(options.get("batch_idle", batch.idle)))}


class CpuDriver(ResourceDriver, ShapesByTier, KeepsFloors, Settles, ReportsDrops):
    """Millicores used per task from BPF; quota and shares written to the task's cgroup."""

    resource = ResourceType.PROCESSOR_CYCLES

    def __init__(self, mounts: CgroupMounts, applier: FileApplier,
                 collector: CpuCollector | None = None,
                 tiers: Mapping[str, CpuShape] | None = None):
        self.mounts = mounts
        self.applier = applier
        self.writer = cpu_writer(mounts)
        self.collector = collector or CpuCollector()
        self.last_dropped: dict[str, int] = {}
        self._throttled: dict[str, ThrottleStats] = {}
        self._withheld: dict[str, float] = {}
        self._last_delta = None
        self.tiers = dict(tiers or TIER_SHAPES)
        self.shapes: dict[str, CpuShape] = {}
        #: task -> millicores its quota and weight never fall below (a critical task's seasonal
        #: floor, runtime.pipeline.ProfileForecast): written to its cgroup, not taken from the pool
        self.floors: dict[str, int] = {}
        #: task -> its tier; the critical tier's units decide core isolation (settle)
        self.tier_of: dict[str, str] = {}
        #: enforce.cpuset.CriticalIsolation when ``critical_isolate`` is on
        self.isolation = None

    def set_priority(self, task: str, priority: str) -> None:
        """The task's tier decides its :class:`CpuShape` (burst, weight, idle) from now on."""
        self.shapes[task] = self.tiers.get(str(priority).lower(), CpuShape())
        self.tier_of[task] = str(priority).lower()

    def set_floor(self, task: str, millicores: int) -> bool:
        """Keep ``task``'s quota and weight at ``millicores`` at least; whether that changed.

        The floor is a ceiling the task may burst to at once, not units it holds: the pool (and
        so the batch tier's quota) is shared by what tasks are forecast to use, and a critical
        task whose burst comes early wins the CPU by its weight until the next tick moves the
        units.  Reserving the floor instead kept the batch tier at static partitioning's level.
        """
        old = self.floors.get(task, 0)
        if millicores > 0:
            self.floors[task] = int(millicores)
        else:
            self.floors.pop(task, None)
        return old != self.floors.get(task, 0)

    def total(self) -> int:
        return online_cpus() * 1000

    def open(self) -> None:
        self.collector.open()

    def measure(self, tasks: Mapping[str, TaskCgroup]) -> dict[str, float]:
        delta = self.collector.drain()
        self._last_delta = delta
        self.last_dropped = delta.dropped
        out = {}
        for name, cg in tasks.items():
            ns = sum(delta.cgroup_ns.get(i, 0) for i in cg.cgroup_ids())
            out[name] = delta.millicores(ns)
        return out

    def censored(self, tasks: Mapping[str, TaskCgroup]) -> dict[str, bool]:
        """Throttled in the last tick (``nr_throttled`` went up) = its quota held it down."""
        out: dict[str, bool] = {}
        self._withheld = {}
        for name, cg in tasks.items():
            now = self.writer.throttle_stats(cg)
            if now is None:
                continue
            before = self._throttled.get(name)
            self._throttled[name] = now
            if before is None:
                continue
            out[name] = now.periods > before.periods
            if out[name] and now.throttled_ns is not None and before.throttled_ns is not None:
                self._withheld[name] = self._interval_mc(max(0, now.throttled_ns
                                                             - before.throttled_ns))
        return out

    def withheld(self, tasks: Mapping[str, TaskCgroup]) -> dict[str, float]:
        """Millicores a throttled task's runnable threads waited for (``throttled_time`` over
        the tick): use + this is what it would have run.  Measured on a 6.18 kernel
        (tools/measure_throttle.py): exact for busy threads; above the demand for threads that
        also sleep, up to a whole CPU per thread, as their backlog keeps them runnable; at or
        below it in the tick a burst begins, as the kernel adds the time when a period
        unthrottles them.
        Below the demand, too, when processes outside the group keep the CPUs busy: the time a
        throttled task then waits on the runqueue is not throttled time (two unmanaged busy
        loops on a 2-vCPU VM took a busy task held at 200 millicores from 1000 to about 500)."""
        return {n: mc for n, mc in self._withheld.items() if n in tasks}

    def _interval_mc(self, ns: int) -> float:
        return self._last_delta.millicores(ns) if self._last_delta is not None else 0.0

    def plan(self, cg: TaskCgroup, units: int) -> list[Write]:
        return self.writer.plan(cg, max(units, self.floors.get(cg.name, 0)),
                                self.shapes.get(cg.name, CpuShape()))

    def apply(self, cg: TaskCgroup, units: int) -> Sequence[Write]:
        return self.applier.apply(self.plan(cg, units))

    def settle(self, tasks: Mapping[str, TaskCgroup], units: Mapping[str, int]):
        """After the tick's quotas: keep normal/batch tasks off the cores a critical burst needs
        (enforce.cpuset), from the critical tier's units; None when isolation is off."""
        if self.isolation is None:
            return None
        critical = sum(units.get(n, 0) for n in tasks if self.tier_of.get(n) == "critical")
        lower = {n: cg for n, cg in tasks.items() if self.tier_of.get(n) in ("normal", "batch")}
        return self.isolation.settle(critical, lower)

    def close(self) -> None:
        self.collector.close()


#: ``[resources.cpu] critical_isolate`` when not set (README, co-location benchmark).
ISOLATE_DEFAULT = False
#: ``critical_isolate_above``: the critical tier's millicores that count as a burst.
ISOLATE_ABOVE_DEFAULT = 250.0


def isolation(ctx: DriverContext, opts: Mapping[str, object]):
    """The core-isolation step for ``critical_isolate`` (enforce.cpuset), or None when off.

    Asked for explicitly on a host without a cpuset controller: FeatureMissing, said at start.
    """
    if not opts.get("critical_isolate", ISOLATE_DEFAULT):
        return None
    from rswap_ebpf.host.cgroup import CgroupManager
    from rswap_ebpf.host.cpu.cpuset import CpusetIsolator, CriticalIsolation, IsolationPolicy

    try:
        isolator = CpusetIsolator(ctx.mounts, ctx.journal, ctx.applier, ctx.dry_run,
                                  CgroupManager(ctx.journal, ctx.mounts).enable_controllers)
    except FeatureMissing:
        if "critical_isolate" in opts:
            raise
        return None
    daemon = getattr(ctx.config, "daemon", None)
    policy = IsolationPolicy(float(opts.get("critical_isolate_above", ISOLATE_ABOVE_DEFAULT)),
                             getattr(daemon, "hold_ticks", 1), getattr(daemon, "deadband", 0.1))
    return CriticalIsolation(isolator, policy)


def make(ctx: DriverContext) -> CpuDriver:
    opts = getattr(ctx.config, "options", {}).get(ResourceType.PROCESSOR_CYCLES, {})
    driver = CpuDriver(ctx.mounts, ctx.applier, tiers=tier_shapes(opts))
    driver.isolation = isolation(ctx, opts)
    return driver
