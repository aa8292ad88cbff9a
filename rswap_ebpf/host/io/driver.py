"""Storage IOPS: block_rq_issue BPF accounting + io.max / v1 blkio throttling on one device.

By tier, like the CPU: a critical task is never throttled (its throttle rule is removed; the
operator's ``io = { max = N }`` is the one limit it gets), so its reads and writes go to the
device as fast as the device serves them.  A throttle on a critical task sized to its forecast
holds back exactly the requests of a burst the forecast did not see, and a request held by the
throttle waits a whole slice.  Other tasks are throttled at their allocation: what the pool
leaves them once the critical tier's forecast is served.
"""
from __future__ import annotations

from collections.abc import Mapping

from rswap_ebpf.host.io.enforcer import BlockDevice, IoEnforcer, IoLimit, io_writer
from rswap_ebpf.host.cgroup import TaskCgroup, Write
from rswap_ebpf.errors import ConfigError
from rswap_ebpf.model.resources import ResourceType
from rswap_ebpf.host.io.collector import BlockCollector, kdev
from rswap_ebpf.host.driver import DriverContext, ReportsDrops, ResourceDriver, ShapesByTier

IO = ResourceType.STORAGE_IOPS


class IoDriver(ResourceDriver, ReportsDrops, ShapesByTier):
    """IO/s per task on ``device``; the pool's total is the device's configured IOPS capacity.

    A task's use is what the BPF program charged to its cgroups, or the kernel's own per-cgroup
    count when that is higher: a bio held back by the throttle is issued later from a kworker,
    which block_rq_issue charges to the kworker, so a capped task would read low (half its cap in
    a test) and never look capped enough to be given more.
    """

    resource = IO

    def __init__(self, ctx: DriverContext, device: BlockDevice, tasks: set[str],
                 collector: BlockCollector | None = None):
        self.device = device
        self.tasks = tasks
        self.configured_total = ctx.config.totals.get(IO) if ctx.config is not None else None
        self.enforcer = IoEnforcer(ctx.journal, io_writer(ctx.mounts), dry_run=ctx.dry_run)
        self.collector = collector or BlockCollector()
        self.kdev = kdev(device.major, device.minor)
        self.last_dropped: dict[str, int] = {}
        self._serviced: dict[str, int] = {}
        self.tier_of: dict[str, str] = {}
        self.max_units: dict[str, int] = {}

    def set_priority(self, task: str, priority: str) -> None:
        self.tier_of[task] = str(priority).lower()

    def set_limit(self, task: str, max_units: int | None) -> None:
        if max_units is None:
            self.max_units.pop(task, None)
        else:
            self.max_units[task] = int(max_units)

    def limit_for(self, task: str, units: int) -> IoLimit:
        """A critical task: no throttle, or the operator's max; any other: its allocation."""
        if self.tier_of.get(task) == "critical":
            cap = self.max_units.get(task)
            return IoLimit.iops(cap) if cap is not None else IoLimit()
        return IoLimit.iops(units)

    def total(self) -> int:
        if not self.configured_total:
            # A device's IOPS capacity cannot be read from the kernel; guessing would hand out
            # units that do not exist.
            raise ConfigError("resources.io.total", f"give the IOPS capacity of {self.device.path or self.device.majmin}")
        return self.configured_total

    def open(self) -> None:
        self.collector.open()

    def measure(self, tasks: Mapping[str, TaskCgroup]) -> dict[str, float]:
        delta = self.collector.drain()
        self.last_dropped = delta.dropped
        out = {}
        for name, cg in tasks.items():
            if name not in self.tasks:
                continue
            out[name] = delta.iops(delta.for_cgroups(cg.cgroup_ids(), self.kdev))
            now = self.enforcer.writer.serviced(cg, self.device)
            before = self._serviced.get(name)
            if now is not None:
                self._serviced[name] = now
            if now is not None and before is not None and now >= before and delta.interval_ns > 0:
                out[name] = max(out[name], (now - before) * 1e9 / delta.interval_ns)
        return out

    def plan(self, cg: TaskCgroup, units: int) -> list[Write]:
        return self.enforcer.writer.plan(cg, self.device, self.limit_for(cg.name, units))

    def apply(self, cg: TaskCgroup, units: int) -> list[Write]:
        if cg.name not in self.tasks:
            return []
        return self.enforcer.apply(cg, self.device, self.limit_for(cg.name, units))

    def close(self) -> None:
        try:
            self.enforcer.restore()
        finally:
            self.collector.close()


def make(ctx: DriverContext) -> IoDriver:
    targets = {t.name: t.targets[IO] for t in ctx.config.tasks if IO in getattr(t, "targets", {})}
    devices = {(d.major, d.minor) for d in targets.values()}
    if not devices:
        raise ConfigError("task.io.device", "no task names a block device for its io limit")
    if len(devices) > 1:
        raise ConfigError("task.io.device", "every io task must name the same device "
                          f"(the pool is one device's IOPS); got {sorted(f'{a}:{b}' for a, b in devices)}")
    return IoDriver(ctx, next(iter(targets.values())), set(targets))
