"""CPU: sched_switch BPF accounting + cgroup CPU quota (v2 ``cpu.max`` or v1 CFS quota)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..enforce.cgroup import CgroupMounts, FileApplier, TaskCgroup, Write, cpu_writer, online_cpus
from ..resources import ResourceType
from ..sense.cpu import CpuCollector
from .base import DriverContext, ResourceDriver


class CpuDriver(ResourceDriver):
    """Millicores used per task from BPF; quota and shares written to the task's cgroup."""

    resource = ResourceType.PROCESSOR_CYCLES

    def __init__(self, mounts: CgroupMounts, applier: FileApplier,
                 collector: CpuCollector | None = None):
        self.mounts = mounts
        self.applier = applier
        self.writer = cpu_writer(mounts)
        self.collector = collector or CpuCollector()
        self.last_dropped: dict[str, int] = {}
        self._throttled: dict[str, int] = {}

    def total(self) -> int:
        return online_cpus() * 1000

    def open(self) -> None:
        self.collector.open()

    def measure(self, tasks: Mapping[str, TaskCgroup]) -> dict[str, float]:
        delta = self.collector.drain()
        self.last_dropped = delta.dropped
        out = {}
        for name, cg in tasks.items():
            ns = sum(delta.cgroup_ns.get(i, 0) for i in cg.cgroup_ids())
            out[name] = delta.millicores(ns)
        return out

    def censored(self, tasks: Mapping[str, TaskCgroup]) -> dict[str, bool]:
        """Throttled in the last tick (``nr_throttled`` went up) = its quota held it down."""
        out = {}
        for name, cg in tasks.items():
            now = self.writer.throttled_count(cg)
            if now is None:
                continue
            before = self._throttled.get(name)
            self._throttled[name] = now
            if before is not None:
                out[name] = now > before
        return out

    def plan(self, cg: TaskCgroup, units: int) -> list[Write]:
        return self.writer.plan(cg, units)

    def apply(self, cg: TaskCgroup, units: int) -> Sequence[Write]:
        return self.applier.apply(self.plan(cg, units))

    def close(self) -> None:
        self.collector.close()


def make(ctx: DriverContext) -> CpuDriver:
    return CpuDriver(ctx.mounts, ctx.applier)
