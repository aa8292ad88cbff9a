"""Resource drivers: the narrow interface between the control plane and the kernel.

A driver pairs one collector (sense) with one enforcer (enforce) for one :class:`ResourceType`.
The runtime only knows these interfaces, so the same control plane runs on real hooks, on a fake
tree in tests, or on a recorded trace (``offline/replay.py``).

What a driver can do is declared by the classes it derives from, and the runtime asks with
``isinstance``, never by probing for a method:

=================  ==================================================================
:class:`Reads`     ``measure`` (and ``censored`` / ``withheld``): the tick's usage
:class:`Enforces`  ``plan`` / ``apply``: the task's units written to the host
:class:`Admits`    ``fit`` / ``place`` / ``release``: placement before a task starts (GPU)
:class:`ShapesByTier`  ``set_priority``: the task's tier shapes how it is enforced (CPU)
:class:`KeepsFloors`   ``set_floor`` / ``floors``: a critical floor under the limit (CPU)
:class:`Settles`   ``settle``: one pass over the whole tier after the tick's writes (cpusets)
:class:`ReportsDrops`  ``last_dropped``: events a full BPF map made the collector lose
=================  ==================================================================

:class:`ResourceDriver` is the usual one: it reads and enforces.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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


class Driver:
    """What every driver has: its resource, the pool it offers (``total``), open and close."""

    resource: ResourceType

    def total(self) -> int:
        raise NotImplementedError

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass


class Reads:
    """Senses the resource: each task's units over the last tick."""

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


class Enforces:
    """Writes a task's units to the host."""

    def plan(self, cg: TaskCgroup, units: int) -> list[Write]:
        raise NotImplementedError

    def apply(self, cg: TaskCgroup, units: int) -> list[Write]:
        raise NotImplementedError


class Admits:
    """Places a task before it starts (a GPU with room for its forecast)."""

    def fit(self, task: str, need_bytes: int, predicted: float | None = None) -> Any:
        """Where ``task`` would go now; records nothing."""
        raise NotImplementedError

    def place(self, task: str, need_bytes: int, predicted: float | None = None) -> Any:
        """:meth:`fit`, and reserve the place when it fits."""
        raise NotImplementedError

    def release(self, task: str) -> None:
        raise NotImplementedError


class ShapesByTier:
    """Enforces a task by its tier (CPU: burst, weight, idle)."""

    def set_priority(self, task: str, priority: str) -> None:
        raise NotImplementedError

    def set_limit(self, task: str, max_units: int | None) -> None:
        """The operator's ceiling for ``task`` (its configured ``max``), held whatever its tier."""
        raise NotImplementedError


class KeepsFloors:
    """Keeps a critical task's seasonal floor under its limit instead of units held from the
    pool; ``floors`` is task -> the floor kept now."""

    floors: dict[str, int]

    def set_floor(self, task: str, units: int) -> bool:
        """Keep ``task`` at ``units`` at least (0: no floor); whether that changed anything."""
        raise NotImplementedError


class Settles:
    """Acts on a whole tier once the tick's units are written (cpuset isolation)."""

    def settle(self, tasks: Mapping[str, TaskCgroup], units: Mapping[str, int]) -> Any:
        """The state it settled in (with ``cores`` and ``lower_cpus`` when it isolates)."""
        raise NotImplementedError


class ReportsDrops:
    """Its collector's overflow counters: label -> events dropped so far (they only grow)."""

    last_dropped: dict[str, int]


class ReportsRunqueue:
    """Reports how long its tasks waited to run (CPU: the run-queue delay BPF program), for the
    status, ``rswap top`` and the metrics; None when it has no such signal."""

    def runq_report(self) -> dict | None:
        raise NotImplementedError


class ResourceDriver(Driver, Reads, Enforces):
    """One resource: ``total()`` (monitor), ``measure()`` (sense), ``apply()`` (enforce)."""
