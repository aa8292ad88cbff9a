"""The seed's data model: resource types, their pool, and the invariants that always hold.

Every allocation is an integer number of the type's unit.  For any resource at any time::

    0 <= allocation            for every task
    sum(allocations) <= total
    available == total - sum(allocations)

The pool refuses (``ResourceError``) any change that would break these, and changes nothing then.
"""
from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .errors import ConfigError, ResourceError


class ResourceType(enum.Enum):
    """The kinds of resource rswap pools, each with the unit its allocations are counted in."""

    PROCESSOR_CYCLES = ("cpu", "millicores", "thousandths of one CPU over the enforcement period")
    CACHE = ("cache", "ways", "last-level cache ways (Intel CAT / AMD L3 QoS)")
    MEMORY_BANDWIDTH = ("membw", "percent", "memory bandwidth, percent of a domain (MBA)")
    GPU_MEMORY = ("gpu_memory", "bytes", "GPU memory")
    NETWORK_BANDWIDTH = ("net", "bytes_per_s", "egress bandwidth of an interface")
    STORAGE_IOPS = ("io", "iops", "block requests per second on one device")
    SPECIALIZED_COPROC = ("coproc", "units", "units of a registered co-processor")

    def __init__(self, key: str, unit: str, description: str):
        self.key = key
        self.unit = unit
        self.description = description

    @classmethod
    def parse(cls, text: str, field_name: str = "resource") -> ResourceType:
        """Accept the short key (``cpu``), the member name or the seed's CamelCase name."""
        norm = str(text).strip().lower().replace("-", "_")
        for member in cls:
            if norm in (member.key, member.name.lower(), member.name.lower().replace("_", "")):
                return member
        known = ", ".join(m.key for m in cls)
        raise ConfigError(field_name, f"unknown resource {text!r} (known: {known})")


def check_units(value: object, field_name: str = "units") -> int:
    """An integer number of units >= 0, or a ConfigError naming the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(field_name, f"expected a non-negative number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(field_name, f"expected a non-negative number, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ConfigError(field_name, f"expected a finite number, got {value!r}")
    if number < 0:
        raise ConfigError(field_name, f"must not be negative, got {value!r}")
    return int(round(number))


@dataclass
class ResourceInfo:
    """One resource of the pool: its total, what is free, and who holds what."""

    type: ResourceType
    total_units: int
    allocations: dict[str, int] = field(default_factory=dict)
    name: str = ""

    @property
    def allocated_units(self) -> int:
        return sum(self.allocations.values())

    @property
    def available_units(self) -> int:
        return self.total_units - self.allocated_units

    def check(self) -> None:
        """Raise ResourceError if an invariant does not hold."""
        if any(units < 0 for units in self.allocations.values()):
            raise ResourceError(f"{self.type.key}: negative allocation in {self.allocations}")
        if self.allocated_units > self.total_units:
            raise ResourceError(
                f"{self.type.key}: {self.allocated_units} {self.type.unit} allocated "
                f"> total {self.total_units}"
            )


@dataclass(frozen=True)
class ResourceSnapshot:
    """What ``get_available_resources`` returns: an immutable view of one resource."""

    type: ResourceType
    total_units: int
    available_units: int
    allocations: Mapping[str, int]


Monitor = Callable[[], int]


class ResourcePool:
    """Total, available and per-task allocations of every registered resource.

    Thread-safe: the control socket and the tick loop may both call into it.
    """

    def __init__(self) -> None:
        self._resources: dict[ResourceType, ResourceInfo] = {}
        self._monitors: dict[ResourceType, Monitor] = {}
        self._lock = threading.RLock()

    # -- the seed's API -------------------------------------------------------------------
    def register_resource(self, rtype: ResourceType, total_units: int, name: str = "") -> ResourceInfo:
        total = check_units(total_units, f"{rtype.key}.total_units")
        with self._lock:
            info = self._resources.get(rtype)
            if info is None:
                info = ResourceInfo(rtype, total, name=name or rtype.key)
                self._resources[rtype] = info
            else:
                if total < info.allocated_units:
                    raise ResourceError(
                        f"{rtype.key}: cannot shrink total to {total} {rtype.unit}, "
                        f"{info.allocated_units} are allocated; deallocate first"
                    )
                info.total_units = total
            return info

    def monitor_resource(self, rtype: ResourceType, monitor: Monitor | None = None) -> int:
        """Refresh a resource's total from its monitor (e.g. online CPUs) and return it.

        With ``monitor`` given, it is remembered for later refreshes.  When the new total is
        below what is allocated the total is kept and allocations are left for the manager to
        shrink, so the invariants still hold.
        """
        with self._lock:
            if monitor is not None:
                self._monitors[rtype] = monitor
            info = self._info(rtype)
            fn = self._monitors.get(rtype)
            if fn is not None:
                total = check_units(fn(), f"{rtype.key}.total_units")
                info.total_units = max(total, info.allocated_units)
            return info.total_units

    def get_available_resources(self, rtype: ResourceType | None = None):
        """A snapshot of one resource, or of all of them as ``{type: snapshot}``."""
        with self._lock:
            if rtype is not None:
                return self._snapshot(self._info(rtype))
            return {t: self._snapshot(i) for t, i in self._resources.items()}

    # -- allocation primitives used by the swap manager ----------------------------------
    def allocation(self, rtype: ResourceType, task: str) -> int:
        with self._lock:
            return self._info(rtype).allocations.get(task, 0)

    def available(self, rtype: ResourceType) -> int:
        with self._lock:
            return self._info(rtype).available_units

    def total(self, rtype: ResourceType) -> int:
        with self._lock:
            return self._info(rtype).total_units

    def set_allocation(self, rtype: ResourceType, task: str, units: int) -> None:
        """Set ``task``'s allocation, refusing anything that breaks an invariant."""
        units = check_units(units, f"{rtype.key}.allocation")
        with self._lock:
            info = self._info(rtype)
            current = info.allocations.get(task, 0)
            if units - current > info.available_units:
                raise ResourceError(
                    f"{rtype.key}: {task} asks {units} {rtype.unit}, only "
                    f"{info.available_units + current} can be given"
                )
            if units == 0:
                info.allocations.pop(task, None)
            else:
                info.allocations[task] = units

    def transfer(self, rtype: ResourceType, source: str, target: str, units: int) -> None:
        """Move ``units`` from ``source`` to ``target`` atomically."""
        units = check_units(units, f"{rtype.key}.units")
        with self._lock:
            info = self._info(rtype)
            held = info.allocations.get(source, 0)
            if units > held:
                raise ResourceError(f"{rtype.key}: {source} holds {held} {rtype.unit}, not {units}")
            self.set_allocation(rtype, source, held - units)
            self.set_allocation(rtype, target, info.allocations.get(target, 0) + units)

    def release(self, task: str, rtype: ResourceType | None = None) -> dict[ResourceType, int]:
        """Drop ``task``'s allocations (of one type or all); return what was freed."""
        freed: dict[ResourceType, int] = {}
        with self._lock:
            for t, info in self._resources.items():
                if rtype is not None and t is not rtype:
                    continue
                units = info.allocations.pop(task, 0)
                if units:
                    freed[t] = units
        return freed

    def types(self) -> list[ResourceType]:
        with self._lock:
            return list(self._resources)

    def __contains__(self, rtype: ResourceType) -> bool:
        return rtype in self._resources

    def check(self) -> None:
        with self._lock:
            for info in self._resources.values():
                info.check()

    def _info(self, rtype: ResourceType) -> ResourceInfo:
        try:
            return self._resources[rtype]
        except KeyError:
            raise ResourceError(
                f"{rtype.key} is not registered in the pool; register_resource() it first"
            ) from None

    @staticmethod
    def _snapshot(info: ResourceInfo) -> ResourceSnapshot:
        return ResourceSnapshot(info.type, info.total_units, info.available_units,
                                dict(info.allocations))
