"""Resource drivers: the narrow interface between the control plane and the kernel.

A driver pairs one collector (sense) with one enforcer (enforce) for one :class:`ResourceType`.
The daemon only knows this interface, so the same control plane runs on real hooks, on a fake tree
in tests, or on a recorded trace.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .enforce.cgroup import CgroupMounts, FileApplier, TaskCgroup, Write, cpu_writer, online_cpus
from .resources import ResourceType
from .sense.cpu import CpuCollector


@dataclass(frozen=True)
class FeatureCheck:
    """One line of ``rswap doctor``."""

    feature: str
    status: str  # ok | missing | fallback
    detail: str = ""
    fix: str = ""
    needed_by: tuple[ResourceType, ...] = ()


class ResourceDriver:
    resource: ResourceType

    def total(self) -> int:
        raise NotImplementedError

    def open(self) -> None:
        pass

    def measure(self, tasks: Mapping[str, TaskCgroup]) -> dict[str, float]:
        """Units each task used over the last tick."""
        raise NotImplementedError

    def plan(self, cg: TaskCgroup, units: int) -> list[Write]:
        raise NotImplementedError

    def apply(self, cg: TaskCgroup, units: int) -> list[Write]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class CpuDriver(ResourceDriver):
    """sched_switch BPF accounting + cgroup CPU quota (v2 ``cpu.max`` or v1 CFS quota)."""

    resource = ResourceType.PROCESSOR_CYCLES

    def __init__(self, mounts: CgroupMounts, applier: FileApplier,
                 collector: CpuCollector | None = None):
        self.mounts = mounts
        self.applier = applier
        self.writer = cpu_writer(mounts)
        self.collector = collector or CpuCollector()
        self.last_dropped: dict[str, int] = {}

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

    def plan(self, cg: TaskCgroup, units: int) -> list[Write]:
        return self.writer.plan(cg, units)

    def apply(self, cg: TaskCgroup, units: int) -> Sequence[Write]:
        return self.applier.apply(self.plan(cg, units))

    def close(self) -> None:
        self.collector.close()
