"""The seed's data model: resource types, their pool, and the invariants that always hold.

Every allocation is an integer number of the type's unit.  For any resource at any time::

    0 <= allocation            for every task
    sum(allocations) <= total
    available == total - sum(allocations)

The pool refuses (``ResourceError``) any change that would break these, and changes nothing then.

A host may have several resources of one type (two co-processors).  Those are told apart by a
:class:`ResourceId` (type + instance name, key ``coproc:fpga0``); a bare :class:`ResourceType` is
the one resource of its type.  Both are hashable, carry ``key``, ``unit`` and ``type``, and are
accepted wherever a resource is: pool, manager, profiles, drivers, status.
"""
from __future__ import annotations

import enum
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat

from rswap_ebpf.errors import ConfigError, ResourceError


class ResourceType(enum.Enum):
    """The kinds of resource rswap pools, each with the unit its allocations are counted in."""

    PROCESSOR_CYCLES = ("cpu", "millicores", "thousandths of one CPU over the enforcement period")
    CACHE = ("cache", "ways", "last-level cache ways (Intel CAT / AMD L3 QoS)")
    MEMORY_BANDWIDTH = ("membw", "percent", "memory bandwidth, percent of a domain (MBA)")
    GPU_MEMORY = ("gpu_memory", "bytes", "GPU memory")
    NETWORK_BANDWIDTH = ("net", "bytes_per_s", "egress bandwidth of an interface")
    STORAGE_IOPS = ("io", "iops", "block requests per second on one device")
    SPECIALIZED_COPROC = ("coproc", "units", "units of a registered co-processor")

    #: Members are singletons compared by identity, so identity is their hash too: Enum's own
    #: ``__hash__`` is a Python function (a hash of the name), and a resource-keyed lookup is
    #: the tick's most frequent operation (tens of them per task and resource).  Neither hash is
    #: stable across processes; nothing stores one.
    __hash__ = object.__hash__

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

    @property
    def type(self) -> ResourceType:
        """The type itself (a :class:`ResourceId` answers its type): code can ask either."""
        return self

    @property
    def instance(self) -> str:
        """The instance name: none for a bare type."""
        return ""


#: types a host may register several named instances of (``[resources.coproc.<name>]``).
MULTI_INSTANCE: frozenset[ResourceType] = frozenset({ResourceType.SPECIALIZED_COPROC})

_INSTANCE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")


def check_instance_name(name: object, field_name: str = "name") -> str:
    """A co-processor's name: it appears in keys (``coproc:fpga0``), metric labels and files."""
    if not isinstance(name, str) or not _INSTANCE_RE.fullmatch(name):
        raise ConfigError(field_name, f"{name!r} is not a valid co-processor name (a letter or "
                                      "digit, then letters, digits, '.', '_', '-'; at most 32)")
    return name


@dataclass(frozen=True, repr=False)
class ResourceId:
    """One of several resources of a type, e.g. ``ResourceId(SPECIALIZED_COPROC, "fpga0")``.

    >>> fpga = ResourceId(ResourceType.SPECIALIZED_COPROC, "fpga0")
    >>> fpga.key, fpga.unit, fpga == parse_resource("coproc:fpga0")
    ('coproc:fpga0', 'units', True)
    """

    type: ResourceType
    instance: str

    def __post_init__(self) -> None:
        if self.type not in MULTI_INSTANCE:
            raise ConfigError(self.type.key, "has one resource per host; it takes no name")
        check_instance_name(self.instance, f"{self.type.key} name")

    @property
    def key(self) -> str:
        return f"{self.type.key}:{self.instance}"

    @property
    def unit(self) -> str:
        return self.type.unit

    @property
    def description(self) -> str:
        return f"{self.type.description} ({self.instance})"

    def __str__(self) -> str:
        return self.key

    def __repr__(self) -> str:
        return f"ResourceId({self.key!r})"


#: what every resource argument accepts: the one resource of a type, or a named instance.
Resource = ResourceType | ResourceId


def parse_resource(text: str, field_name: str = "resource") -> Resource:
    """``cpu`` -> ``ResourceType.PROCESSOR_CYCLES``; ``coproc:fpga0`` -> its ``ResourceId``."""
    base, sep, instance = str(text).partition(":")
    rtype = ResourceType.parse(base, field_name)
    if not sep:
        return rtype
    if rtype not in MULTI_INSTANCE:
        raise ConfigError(field_name, f"{text!r}: {rtype.key} has one resource per host; "
                                      f"write {rtype.key}")
    return ResourceId(rtype, check_instance_name(instance, field_name))


#: the largest count any kernel file rswap writes takes (a signed 64-bit integer)
MAX_UNITS = 2**63 - 1

#: per resource type, the most units that still fit the kernel file they end up in: CPU
#: millicores become a CFS quota (``millicores * period / 1000`` us), bounded here by the most
#: CPUs Linux supports (NR_CPUS 8192); a cache bit mask has at most 64 ways; bandwidth is a
#: percentage; tc takes bytes/s that it may count in bits (x 8); the rest are u64 counters.
UNIT_LIMITS: dict[ResourceType, int] = {
    ResourceType.PROCESSOR_CYCLES: 8192 * 1000,
    ResourceType.CACHE: 64,
    ResourceType.MEMORY_BANDWIDTH: 100,
    ResourceType.GPU_MEMORY: MAX_UNITS,
    ResourceType.NETWORK_BANDWIDTH: MAX_UNITS // 8,
    ResourceType.STORAGE_IOPS: MAX_UNITS,
    ResourceType.SPECIALIZED_COPROC: MAX_UNITS,
}


def unit_limit(resource: Resource | None) -> int:
    """The most units of ``resource`` (any resource when None) rswap accepts anywhere."""
    return MAX_UNITS if resource is None else UNIT_LIMITS.get(resource.type, MAX_UNITS)


def check_units(value: object, field_name: str = "units", resource: Resource | None = None) -> int:
    """An integer number of units in ``[0, unit_limit(resource)]``, or a ConfigError naming the
    field: nothing passes that the kernel file it ends up in would refuse."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(field_name, f"expected a non-negative number, got {value!r}")
    if isinstance(value, int):
        number: int | float = value
    else:
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(field_name, f"expected a non-negative number, "
                              f"got {value!r}") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise ConfigError(field_name, f"expected a finite number, got {value!r}")
    if number < 0:
        raise ConfigError(field_name, f"must not be negative, got {value!r}")
    limit = unit_limit(resource)
    if number > limit:
        unit = f" {resource.unit}" if resource is not None else ""
        raise ConfigError(field_name, f"{value!r} is more than the kernel takes: at most "
                          f"{limit}{unit}")
    return int(round(number))


class Allocations(dict):
    """Task -> units, keeping their sum (``allocated``) as every change is made.

    The pool asks what is free at each change; summing every task's units there made one
    change O(tasks) and a tick O(tasks x changes).  Every way a dict can change goes through
    here (set, delete, pop, popitem, clear, update, setdefault, ``|=``), so the sum cannot drift.
    """

    __slots__ = ("allocated",)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.allocated = sum(self.values())

    def __setitem__(self, task: str, units: int) -> None:
        old = dict.get(self, task, 0)
        dict.__setitem__(self, task, units)
        self.allocated += units - old

    def __delitem__(self, task: str) -> None:
        units = self[task]
        dict.__delitem__(self, task)
        self.allocated -= units

    _MISSING = object()

    def pop(self, task, default=_MISSING):
        if task in self:
            units = dict.pop(self, task)
            self.allocated -= units
            return units
        if default is Allocations._MISSING:
            raise KeyError(task)
        return default

    def popitem(self):
        task, units = dict.popitem(self)
        self.allocated -= units
        return task, units

    def clear(self) -> None:
        dict.clear(self)
        self.allocated = 0

    def update(self, *args, **kwargs) -> None:
        for task, units in dict(*args, **kwargs).items():
            self[task] = units

    def setdefault(self, task, default=0):
        if task not in self:
            self[task] = default
        return self[task]

    def __ior__(self, other):
        self.update(other)
        return self

    def __reduce__(self):
        return type(self), (dict(self),)


@dataclass
class ResourceInfo:
    """One resource of the pool: its total, what is free, and who holds what.

    ``resource`` is what the pool keys it by: ``type`` itself, or the named instance.
    ``allocations`` keeps its own sum (:class:`Allocations`), so what is free is known at once.
    """

    type: ResourceType
    total_units: int
    allocations: Allocations = field(default_factory=Allocations)
    name: str = ""
    resource: Resource | None = None

    def __post_init__(self) -> None:
        if self.resource is None:
            self.resource = self.type
        if not isinstance(self.allocations, Allocations):
            self.allocations = Allocations(self.allocations)

    @property
    def allocated_units(self) -> int:
        return self.allocations.allocated

    @property
    def available_units(self) -> int:
        return self.total_units - self.allocations.allocated

    def check(self) -> None:
        """Raise ResourceError if an invariant does not hold."""
        if any(units < 0 for units in self.allocations.values()):
            raise ResourceError(f"{self.resource.key}: negative allocation in {self.allocations}")
        counted = sum(self.allocations.values())
        if counted != self.allocations.allocated:
            raise ResourceError(
                f"{self.resource.key}: the pool's running total ({self.allocations.allocated} "
                f"{self.type.unit}) is not the sum of its allocations ({counted}); this is a "
                "bug in rswap: report it with the log")
        if self.allocated_units > self.total_units:
            raise ResourceError(
                f"{self.resource.key}: {self.allocated_units} {self.type.unit} allocated "
                f"> total {self.total_units}"
            )


@dataclass(frozen=True)
class ResourceSnapshot:
    """What ``get_available_resources`` returns: an immutable view of one resource."""

    type: ResourceType
    total_units: int
    available_units: int
    allocations: Mapping[str, int]
    resource: Resource | None = None  # the pool's key: the type, or its named instance


Monitor = Callable[[], int]


class ResourcePool:
    """Total, available and per-task allocations of every registered resource.

    Thread-safe: the control socket and the tick loop may both call into it.
    """

    def __init__(self) -> None:
        self._resources: dict[Resource, ResourceInfo] = {}
        self._monitors: dict[Resource, Monitor] = {}
        self._lock = threading.RLock()

    # -- the seed's API -------------------------------------------------------------------
    def register_resource(self, rtype: Resource, total_units: int, name: str = "") -> ResourceInfo:
        """Register (or resize) a resource.  ``name`` registers a named instance of a type a
        host may have several of: ``register_resource(SPECIALIZED_COPROC, 8, name="fpga0")``
        is the resource ``ResourceId(SPECIALIZED_COPROC, "fpga0")``."""
        if name and isinstance(rtype, ResourceType) and rtype in MULTI_INSTANCE:
            rtype = ResourceId(rtype, name)
        total = check_units(total_units, f"{rtype.key}.total_units", rtype)
        with self._lock:
            info = self._resources.get(rtype)
            if info is None:
                info = ResourceInfo(rtype.type, total, name=name or rtype.instance or rtype.key,
                                    resource=rtype)
                self._resources[rtype] = info
            else:
                if total < info.allocated_units:
                    raise ResourceError(
                        f"{rtype.key}: cannot shrink total to {total} {rtype.unit}, "
                        f"{info.allocated_units} are allocated; deallocate first"
                    )
                info.total_units = total
            return info

    def monitor_resource(self, rtype: Resource, monitor: Monitor | None = None) -> int:
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

    def get_available_resources(self, rtype: Resource | None = None):
        """A snapshot of one resource, or of all of them as ``{resource: snapshot}``."""
        with self._lock:
            if rtype is not None:
                return self._snapshot(self._info(rtype))
            return {t: self._snapshot(i) for t, i in self._resources.items()}

    # -- allocation primitives used by the swap manager ----------------------------------
    def allocation(self, rtype: Resource, task: str) -> int:
        with self._lock:
            return self._info(rtype).allocations.get(task, 0)

    def allocations(self, rtype: Resource) -> dict[str, int]:
        """Every task's allocation of ``rtype`` (a copy): one call where a tick reads them all."""
        with self._lock:
            return dict(self._info(rtype).allocations)

    def available(self, rtype: Resource) -> int:
        with self._lock:
            return self._info(rtype).available_units

    def total(self, rtype: Resource) -> int:
        with self._lock:
            return self._info(rtype).total_units

    def set_allocation(self, rtype: Resource, task: str, units: int) -> None:
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

    def allocated(self, rtype: Resource) -> int:
        """Units of ``rtype`` held by all tasks together."""
        with self._lock:
            return self._info(rtype).allocated_units

    def assign(self, rtype: Resource, tasks: Sequence[str], units: Sequence[int]) -> None:
        """``set_allocation(rtype, tasks[i], units[i])`` for each ``i`` in turn (each task once),
        checked as one change: every value a unit count, and what the pool then holds within
        its total; nothing changes if not.  0 removes the task, as there."""
        if not tasks:
            return
        units = list(units)
        if set(map(type, units)) != {int} or min(units) < 0 or max(units) > MAX_UNITS:
            units = [check_units(u, f"{rtype.key}.allocation") for u in units]
        with self._lock:
            info = self._info(rtype)
            alloc = info.allocations
            after = alloc.allocated + sum(units) - sum(map(alloc.get, tasks, repeat(0)))
            if after > info.total_units:
                raise ResourceError(f"{rtype.key}: {after} {rtype.unit} would be allocated, "
                                    f"more than the total {info.total_units}")
            # as one set_allocation after another: a task set keeps its place or comes last,
            # one set to 0 leaves
            dict.update(alloc, zip(tasks, units))
            for task, u in zip(tasks, units):
                if not u:
                    dict.pop(alloc, task)
            alloc.allocated = after

    def transfer(self, rtype: Resource, source: str, target: str, units: int) -> None:
        """Move ``units`` from ``source`` to ``target`` atomically."""
        units = check_units(units, f"{rtype.key}.units")
        with self._lock:
            info = self._info(rtype)
            held = info.allocations.get(source, 0)
            if units > held:
                raise ResourceError(f"{rtype.key}: {source} holds {held} {rtype.unit}, not {units}")
            self.set_allocation(rtype, source, held - units)
            self.set_allocation(rtype, target, info.allocations.get(target, 0) + units)

    def release(self, task: str, rtype: Resource | None = None) -> dict[Resource, int]:
        """Drop ``task``'s allocations (of one resource or all); return what was freed."""
        freed: dict[Resource, int] = {}
        with self._lock:
            for t, info in self._resources.items():
                if rtype is not None and t != rtype:
                    continue
                units = info.allocations.pop(task, 0)
                if units:
                    freed[t] = units
        return freed

    def types(self) -> list[Resource]:
        """Every registered resource (a type, or a named instance of one)."""
        with self._lock:
            return list(self._resources)

    def __contains__(self, rtype: Resource) -> bool:
        return rtype in self._resources

    def check(self) -> None:
        with self._lock:
            for info in self._resources.values():
                info.check()

    def _info(self, rtype: Resource) -> ResourceInfo:
        try:
            return self._resources[rtype]
        except KeyError:
            raise ResourceError(
                f"{rtype.key} is not registered in the pool; register_resource() it first"
            ) from None

    @staticmethod
    def _snapshot(info: ResourceInfo) -> ResourceSnapshot:
        return ResourceSnapshot(info.type, info.total_units, info.available_units,
                                dict(info.allocations), info.resource)
