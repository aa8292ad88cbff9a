"""CPU: sched_switch BPF accounting; kernel weights by tier, quota on the normal tier, and lower
tiers' cpusets during the critical tier's bursts (host.cpu.protect).

The layers, from the bottom (docs/colocation.md):

- weights: a critical task's cgroup gets the top shares/weight and no quota, a batch task's the
  bottom shares/weight (or ``cpu.idle`` with ``batch_idle``) and no quota, what the kubelet
  gives a Guaranteed and a BestEffort pod: work-conserving, batch fills whatever is idle;
- quota: a normal task's CFS quota follows its units in the pool, as before;
- protection: while the critical tier's burst is forecast (or its run-queue delay says it is
  hurt while busy), normal and batch tasks' cpusets leave it cores (``critical_isolate``, on by
  default where a cpuset controller exists).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace

from rswap_ebpf.host.cgroup import CgroupMounts, FileApplier, TaskCgroup, Write, online_cpus
from rswap_ebpf.host.cpu.writer import V1_MAX_SHARES, V1_MIN_SHARES, V2_MAX_WEIGHT, V2_MIN_WEIGHT, CpuShape, ThrottleStats, cpu_writer
from rswap_ebpf.errors import FeatureMissing
from rswap_ebpf.model.resources import ResourceType
from rswap_ebpf.host.cpu.collector import CpuCollector
from rswap_ebpf.host.cpu.protect import ABOVE_DEFAULT, ProtectionPolicy
from rswap_ebpf.host.cpu.runq import RunqCollector, RunqHistogram
from rswap_ebpf.host.driver import (DriverContext, KeepsFloors, ReportsDrops, ReportsRunqueue,
                                    ResourceDriver, Settles, ShapesByTier)

log = logging.getLogger(__name__)

#: The weights layer: a critical group's shares (v1) / weight (v2) per unit of
#: ``critical_weight`` (default 8: 10240 shares, weight 10000, the kubelet's Guaranteed level),
#: and a batch group's (2 shares / weight 1, the kubelet's BestEffort).
CRITICAL_SHARES_PER_WEIGHT, CRITICAL_V2_WEIGHT_PER_WEIGHT = 1280, 1250
BATCH_SHARES, BATCH_V2_WEIGHT = 2, 1


#: What each tier adds (host.cpu.writer.CpuShape).  ``critical_weight`` scales the critical tier's
#: shares (weights layer); ``critical_burst`` applies to a quota, which the critical tier no
#: longer has; batch_idle (SCHED_IDLE batch: preempted as soon as anything wakes) is off by
#: default: on this host it did worse than shares 2 (docs/colocation.md).
TIER_SHAPES = {"critical": CpuShape(burst=True, weight=8.0), "normal": CpuShape(),
               "batch": CpuShape()}


def tier_shapes(options: Mapping[str, object]) -> dict[str, CpuShape]:
    crit, batch = TIER_SHAPES["critical"], TIER_SHAPES["batch"]
    return {"critical": CpuShape(burst=bool(options.get("critical_burst", crit.burst)),
                                 weight=float(options.get("critical_weight", crit.weight))),
            "normal": TIER_SHAPES["normal"],
            "batch": CpuShape(idle=bool(options.get("batch_idle", batch.idle)))}


class CpuDriver(ResourceDriver, ShapesByTier, KeepsFloors, Settles, ReportsDrops,
                ReportsRunqueue):
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
        #: host.cpu.cpuset.CriticalIsolation when ``critical_isolate`` is on
        self.isolation = None
        #: when and how much to isolate (prediction + run-queue feedback)
        self.protection = ProtectionPolicy()
        #: the run-queue delay collector (None: not loadable here, said once at open)
        self.runq: RunqCollector | None = None
        #: task -> its run-queue delay histogram over the last tick (metrics, `rswap top`)
        self.runq_delay: dict[str, RunqHistogram] = {}
        self._use: dict[str, float] = {}
        #: task -> the operator's ceiling in millicores (set_limit): a quota even on critical
        self.caps: dict[str, int] = {}
        #: task -> its own cpu cgroup directory, for tasks in rswap's subtree (_parent_plan)
        self._owned_dirs: dict[str, str] = {}

    def set_priority(self, task: str, priority: str) -> None:
        """The task's tier decides its :class:`CpuShape` (burst, weight, idle) from now on."""
        self.shapes[task] = self.tiers.get(str(priority).lower(), CpuShape())
        self.tier_of[task] = str(priority).lower()

    def set_limit(self, task: str, max_millicores: int | None) -> None:
        """A ceiling the operator set (a task's ``cpu = { max = N }``): the one quota a critical
        or batch task gets (the task lifecycle says it whenever a task is added)."""
        if max_millicores is None:
            self.caps.pop(task, None)
        else:
            self.caps[task] = int(max_millicores)

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
        if self.runq is None:
            return
        try:
            self.runq.open()
        except FeatureMissing as err:  # the weights and the forecast still work without it
            log.warning("run-queue delay unavailable, no feedback for CPU protection: %s", err)
            self.runq = None

    def measure(self, tasks: Mapping[str, TaskCgroup]) -> dict[str, float]:
        delta = self.collector.drain()
        self._last_delta = delta
        self.last_dropped = dict(delta.dropped)
        out = {}
        for name, cg in tasks.items():
            ns = sum(delta.cgroup_ns.get(i, 0) for i in cg.cgroup_ids())
            out[name] = delta.millicores(ns)
        self._use = out
        if self.runq is not None:
            rq = self.runq.drain()
            self.last_dropped.update(rq.dropped)
            self.runq_delay = {name: rq.of(cg.cgroup_ids()) for name, cg in tasks.items()}
        return out

    def runq_p99_us(self) -> dict[str, float]:
        """Each task's p99 run-queue delay over the last tick (µs, log2 slot bound)."""
        return {n: h.quantile_us(0.99) for n, h in self.runq_delay.items() if h.n}

    def runq_report(self) -> dict | None:
        """The run-queue signal and what protection made of it (the status, `rswap top`, the
        metrics): per task p50/p99/mean delay (µs) and wakeups over the last tick."""
        if self.runq is None:
            return None
        state = getattr(self.isolation, "state", None)
        return {"tasks": {n: {"p50_us": h.quantile_us(0.5), "p99_us": h.quantile_us(0.99),
                              "mean_us": round(h.mean_us(), 1), "n": h.n}
                          for n, h in self.runq_delay.items()},
                "protected_cores": getattr(state, "cores", 0), "period_ticks": self.protection.period,
                "psi": "cpu.pressure per cgroup needs the cgroup v2 cpu controller"
                       if self.writer.version == "v1" else "see each cgroup's cpu.pressure"}

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
        """Critical and batch: the weights layer (no quota); normal: quota from its units."""
        tier = self.tier_of.get(cg.name)
        shape = self.shapes.get(cg.name, CpuShape())
        d = self.writer._dir(cg)
        if cg.owned:
            self._owned_dirs[cg.name] = d
        if tier in ("critical", "batch"):
            if tier == "critical" and cg.owned:
                shape = self._over_foreign(shape, os.path.dirname(d))
            writes = weight_plan(self.writer.version, d, tier, shape)
            cap = self.caps.get(cg.name)
            if cap is not None:  # the operator's ceiling replaces "no quota"
                quota = [w for w in self.writer.plan(cg, cap, CpuShape())
                         if os.path.basename(w[0]) in ("cpu.cfs_quota_us", "cpu.max")]
                writes = quota + writes[1:]
            return writes + self._parent_plan(cg, d)
        return self.writer.plan(cg, max(units, self.floors.get(cg.name, 0)), shape) + \
            self._parent_plan(cg, d)

    def _foreign_weight(self, parent: str) -> int:
        """The shares (v1) or weight (v2) of the cgroups beside ours under ``parent`` that this
        daemon does not manage (another rswap's tasks, a hand-made group): they compete with a
        critical task as its siblings."""
        # owned tasks live in rswap/<name>: every task this driver knows is ours
        ours = {os.path.basename(t) for t in self._owned_dirs.values()} | set(self.tier_of)
        fname = "cpu.shares" if self.writer.version == "v1" else "cpu.weight"
        total = 0
        try:
            entries = os.listdir(parent)
        except OSError:
            return 0
        for e in entries:
            path = os.path.join(parent, e, fname)
            if e in ours or not os.path.isfile(path):
                continue
            try:
                with open(path) as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
        return total

    def _over_foreign(self, shape: CpuShape, parent: str) -> CpuShape:
        """A critical task outweighs unmanaged siblings under rswap/ as it outweighs a plain
        process at the root (10240 against 1024): ten times their summed weight at least."""
        foreign = self._foreign_weight(parent)
        if self.writer.version == "v2":
            foreign = foreign * 1024 // 100
        need = 10 * foreign / CRITICAL_SHARES_PER_WEIGHT
        return replace(shape, weight=max(shape.weight, need)) if need > shape.weight else shape

    def _parent_plan(self, cg: TaskCgroup, d: str) -> list[Write]:
        """rswap's own parent cgroup (``rswap/``) carries the sum of its tasks' weights, so a
        critical task competes with the host's other processes as it would at the root (as
        the kubelet sizes ``kubepods``); without it the parent's default 1024 shares cap the
        whole subtree at one plain process's weight.  Adopted cgroups' parents are left alone."""
        if not cg.owned:
            return []
        parent = os.path.dirname(d)
        if self.tier_of.get(cg.name) == "batch":
            return self._batch_parent_plan(parent)
        total = 0
        for name, tdir in self._owned_dirs.items():
            if os.path.dirname(tdir) != parent:
                continue
            tier, shape = self.tier_of.get(name), self.shapes.get(name, CpuShape())
            if tier == "critical":
                shape = self._over_foreign(shape, parent)
                total += int(CRITICAL_SHARES_PER_WEIGHT * shape.weight)
            elif tier != "batch":
                total += 1024
        total += self._foreign_weight(parent) if self.writer.version == "v1" else \
            self._foreign_weight(parent) * 1024 // 100
        if self.writer.version == "v1":
            shares = min(V1_MAX_SHARES, max(1024, total))
            return [(os.path.join(parent, "cpu.shares"), str(shares))]
        weight = min(V2_MAX_WEIGHT, max(100, total * 100 // 1024))
        return [(os.path.join(parent, "cpu.weight"), str(weight))]

    def _batch_parent_plan(self, parent: str) -> list[Write]:
        """``rswap-batch/`` carries the bottom weight times its tasks (and whatever else lives
        there), so batch work meets the host's other processes at the root as a batch group
        there would; in ``cpu.idle`` when every batch task in it is."""
        names = [n for n, tdir in self._owned_dirs.items()
                 if os.path.dirname(tdir) == parent and self.tier_of.get(n) == "batch"]
        foreign = self._foreign_weight(parent)
        if self.writer.version == "v1":
            writes = [(os.path.join(parent, "cpu.shares"),
                       str(min(V1_MAX_SHARES, max(V1_MIN_SHARES, BATCH_SHARES * len(names) + foreign))))]
        else:
            writes = [(os.path.join(parent, "cpu.weight"),
                       str(min(V2_MAX_WEIGHT, max(V2_MIN_WEIGHT, BATCH_V2_WEIGHT * len(names) + foreign))))]
        idle = os.path.join(parent, "cpu.idle")
        if names and all(self.shapes.get(n, CpuShape()).idle for n in names) and os.path.exists(idle):
            writes.append((idle, "1"))
        return writes

    def apply(self, cg: TaskCgroup, units: int) -> Sequence[Write]:
        return self.applier.apply(self.plan(cg, units))

    def settle(self, tasks: Mapping[str, TaskCgroup], units: Mapping[str, int]):
        """After the tick's writes: keep normal/batch tasks off the cores the critical tier's
        next tick needs (host.cpu.cpuset), from its measured use and run-queue delay
        (host.cpu.protect); None when isolation is off or there is no critical task."""
        if self.isolation is None:
            return None
        crit = [n for n in tasks if self.tier_of.get(n) == "critical"]
        if not crit:
            return None
        use = sum(self._use.get(n, 0.0) for n in crit)
        hist = RunqHistogram()
        for n in crit:
            if n in self.runq_delay:
                hist = hist.merged(self.runq_delay[n])
        delay = hist.quantile_us(0.99) if self.runq is not None else None
        demand = self.protection.update(use, delay)
        lower = {n: cg for n, cg in tasks.items() if self.tier_of.get(n) in ("normal", "batch")}
        return self.isolation.settle(demand, lower)

    def close(self) -> None:
        if self.runq is not None:
            self.runq.close()
        self.collector.close()


def weight_plan(version: str, d: str, tier: str, shape: CpuShape) -> list[Write]:
    """The weights layer's writes for a critical or batch cgroup directory ``d``: no quota, and
    the tier's shares (v1) or weight (v2); ``shape.idle`` puts a batch group in ``cpu.idle``.

    >>> weight_plan("v1", "/cg", "critical", CpuShape(weight=8.0))
    [('/cg/cpu.cfs_quota_us', '-1'), ('/cg/cpu.shares', '10240')]
    >>> weight_plan("v2", "/cg", "batch", CpuShape())
    [('/cg/cpu.max', 'max'), ('/cg/cpu.weight', '1')]
    """
    quota = [(os.path.join(d, "cpu.cfs_quota_us"), "-1")] if version == "v1" else \
        [(os.path.join(d, "cpu.max"), "max")]
    if tier == "batch" and shape.idle and os.path.exists(os.path.join(d, "cpu.idle")):
        return quota + [(os.path.join(d, "cpu.idle"), "1")]
    if version == "v1":
        shares = (int(CRITICAL_SHARES_PER_WEIGHT * shape.weight) if tier == "critical"
                  else BATCH_SHARES)
        return quota + [(os.path.join(d, "cpu.shares"), str(min(V1_MAX_SHARES, max(V1_MIN_SHARES, shares))))]
    weight = (int(CRITICAL_V2_WEIGHT_PER_WEIGHT * shape.weight) if tier == "critical"
              else BATCH_V2_WEIGHT)
    return quota + [(os.path.join(d, "cpu.weight"), str(min(V2_MAX_WEIGHT, max(V2_MIN_WEIGHT, weight))))]


#: ``[resources.cpu] critical_isolate`` when not set: on where the host has a cpuset controller
#: (docs/colocation.md); set explicitly on a host without one, rswap refuses to start.
ISOLATE_DEFAULT = True
#: ``critical_isolate_above``: the critical tier's forecast millicores that make a tick a burst
#: worth a core (host.cpu.protect).
ISOLATE_ABOVE_DEFAULT = ABOVE_DEFAULT


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
    # host.cpu.protect times the isolation itself (a forecast tick or a hurt one): the cores
    # follow its demand at once, with no hysteresis of their own
    return CriticalIsolation(isolator, IsolationPolicy(1.0, 0, 0.0))


def make(ctx: DriverContext) -> CpuDriver:
    opts = getattr(ctx.config, "options", {}).get(ResourceType.PROCESSOR_CYCLES, {})
    driver = CpuDriver(ctx.mounts, ctx.applier, tiers=tier_shapes(opts))
    driver.isolation = isolation(ctx, opts)
    driver.protection = ProtectionPolicy(
        above_millicores=float(opts.get("critical_isolate_above", ISOLATE_ABOVE_DEFAULT)))
    if not ctx.dry_run:  # the signal is shown even where no cpuset can act on it
        driver.runq = RunqCollector()
    return driver
