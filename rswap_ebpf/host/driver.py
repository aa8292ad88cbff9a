"""Resource drivers: the narrow interface between the control plane and the kernel.

A driver pairs one collector (sense) with one enforcer (enforce) for one :class:`ResourceType`.
The daemon only knows this interface, so the same control plane runs on real hooks, on a fake tree
in tests, or on a recorded trace.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from rswap_ebpf.host.cgroup import CgroupMounts, FileApplier, TaskCgroup, Write
from rswap_ebpf.host.journal import Journal
from rswap_ebpf.model.resources import ResourceType


@dataclass(frozen=True)
class FeatureCheck:
    """One line of ``rswap doctor``."""

    feature: str
    status: str  # ok | missing | fallback
    detail: str = ""
    fix: str = ""
    needed_by: tuple[ResourceType, ...] = ()


@dataclass(frozen=True)
class DriverContext:
    """What a driver factory gets: the host's cgroup layout, the journal and the file writer."""

    mounts: CgroupMounts
    journal: Journal
    applier: FileApplier
    config: object  # rswap_ebpf.runtime.config.Config
    dry_run: bool = False


class ResourceDriver:
    """One resource: ``total()`` (monitor), ``measure()`` (sense), ``apply()`` (enforce)."""

    resource: ResourceType

    def total(self) -> int:
        raise NotImplementedError

    def open(self) -> None:
        pass

    def measure(self, tasks: Mapping[str, TaskCgroup]) -> dict[str, float]:
        """Units each task used over the last tick."""
        raise NotImplementedError

    def censored(self, tasks: Mapping[str, TaskCgroup]) -> dict[str, bool]:
        """Per task, whether its last measurement was held down by rswap's own limit.

        A capped task cannot show its real demand; the manager then grows its allocation instead
        of learning the capped figure.  Tasks left out are judged by usage/allocation alone.
        """
        return {}

    def withheld(self, tasks: Mapping[str, TaskCgroup]) -> dict[str, float]:
        """Per censored task, the units the kernel saw it wait for over the last tick.

        Read after :meth:`censored` in the same tick.  Where a driver gives it, the manager takes
        use + withheld as the task's demand instead of guessing by growth; tasks left out grow.
        """
        return {}

    def plan(self, cg: TaskCgroup, units: int) -> list[Write]:
        raise NotImplementedError

    def apply(self, cg: TaskCgroup, units: int) -> list[Write]:
        raise NotImplementedError

    def close(self) -> None:
        pass
