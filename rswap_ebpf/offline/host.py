"""A recorded trace as a host: the drivers' view of it, for the daemon's pipeline.

The trace's demand is what each task would have used had it been given enough (``rswap record``
caps nothing).  :class:`TraceDriver` enforces an allocation the way the daemon's drivers do: a
task uses at most what it holds (never less than :data:`ENFORCED_FLOOR`, the least a cap lets
through), uncapped only before its first allocation, with the kernel's "throttled" flag and
throttled time where the real driver reports them.
"""
from __future__ import annotations

import numpy as np

from rswap_ebpf.host.cgroup import TaskCgroup
from rswap_ebpf.host.driver import Driver, Enforces, Reads
from rswap_ebpf.model.resources import ResourceType

#: The least a cap lets a task use: the CPU driver never writes a quota under 1 ms per 100 ms
#: period (``enforce/cgroup.py``: V1_MIN_QUOTA_US), so a task held at 0 still runs at 10
#: millicores and is seen throttled; other resources are taken to pass at least one unit.
ENFORCED_FLOOR = {ResourceType.PROCESSOR_CYCLES: 10.0}
#: Resources whose driver tells the daemon when its cap held a task down (CPU: ``nr_throttled``
#: went up); for the others the manager judges by use against allocation (``censored=None``).
KERNEL_CENSORS = frozenset({ResourceType.PROCESSOR_CYCLES})
#: Resources whose driver also says how much its cap held back (CPU: :meth:`CpuDriver.withheld`,
#: from ``cpu.stat``'s throttled time), modelled by :func:`throttled_reading`.
KERNEL_READS = frozenset({ResourceType.PROCESSOR_CYCLES})
#: How replay models that reading on a throttled tick (``--reading``): ``demand``, the recorded
#: demand itself (the default); ``backlog``, what a backlog adds (:func:`throttled_reading`);
#: ``growth``, no reading at all: the manager's growth rule.
READINGS = ("demand", "backlog", "growth")


def throttled_reading(demand, cap, total, model: str = "backlog"):
    """Use + throttled time, as the CPU driver reads it, for a task held at ``cap`` below its
    ``demand`` (millicores; numbers or numpy arrays), at most ``total``.

    ``backlog``: a throttled thread waits runnable for as long as work it would have done is
    held back, so across a tick it had work in throughout, the reading runs linearly from the
    demand (cap at the demand) to a whole CPU per thread (cap 0), with the fewest threads that
    use the demand: ``d + (1 - cap/d) * (n*1000 - d)``, ``n = ceil(d/1000)``.  ``demand``: the
    demand itself.  Measured on this VM's 6.18 kernel (``tools/measure_throttle.py``),
    held at 200 and 500 millicores for 3 s: ``backlog`` is within 5% for busy
    threads, a half-busy thread, rswap's demo spinners, ``stress-ng --cpu-load`` and ``dd``,
    where ``demand`` reads up to 37% low; both read low for two threads busy 30%.  In the second
    a burst begins in it is the other way: the reading is 0.03-1.3x the demand, as throttled
    time is credited only when a CFS period unthrottles the group, and ``backlog`` reads up to
    six times too high.  A trace does not say which ticks are which, so replay takes ``demand``
    unless told.
    """
    d = np.maximum(np.asarray(demand, dtype=float), 1e-9)
    if model == "demand":
        est = np.minimum(d, total)
    else:
        c = np.minimum(np.asarray(cap, dtype=float), d)
        whole = np.ceil(d / 1000.0 - 1e-9) * 1000.0
        est = np.minimum(d + (1.0 - c / d) * (whole - d), total)
    return float(est) if est.ndim == 0 else est


class TraceDriver(Driver, Reads, Enforces):
    """A recorded trace as the host's driver for one resource, for the daemon's pipeline.

    :meth:`measure` gives each task's recorded demand at the current tick (:meth:`at`), held at
    what :meth:`apply` last enforced (never below :data:`ENFORCED_FLOOR`) once enforcing has
    begun; :meth:`censored` says so where the real driver's kernel does
    (:data:`KERNEL_CENSORS`), and :meth:`withheld` gives the throttled time it would read
    (:data:`KERNEL_READS`, modelled by ``reading``).
    """

    def __init__(self, resource: ResourceType, series: dict[str, tuple[float, ...]], total: int,
                 reading: str = "demand"):
        self.resource = resource
        self.series = series
        self._total = total
        self.reading = reading
        #: task -> units enforced now (what ``apply`` was last given)
        self.enforced: dict[str, float] = {}
        #: whether allocations hold yet: not before the first one (the daemon's first tick)
        self.enforcing = False
        self.i = 0
        self._censored: dict[str, bool] = {}
        self._withheld: dict[str, float] = {}

    def total(self) -> int:
        return self._total

    def at(self, i: int) -> None:
        self.i = i

    def measure(self, tasks) -> dict[str, float]:
        used: dict[str, float] = {}
        self._censored, self._withheld = {}, {}
        for task in tasks:
            s = self.series.get(task)
            if s is None:
                continue
            d = s[self.i]
            if not self.enforcing:  # nothing capped yet: the kernel saw no throttling
                used[task] = d
                if self.resource in KERNEL_CENSORS:
                    self._censored[task] = False
                continue
            cap = max(float(self.enforced.get(task, 0)), ENFORCED_FLOOR.get(self.resource, 1.0))
            used[task] = min(d, cap)
            if self.resource in KERNEL_CENSORS:
                self._censored[task] = d > cap
            if d > cap and self.reading != "growth" and self.resource in KERNEL_READS:
                self._withheld[task] = throttled_reading(d, cap, self._total,
                                                         self.reading) - used[task]
        return used

    def censored(self, tasks) -> dict[str, bool]:
        return dict(self._censored)

    def withheld(self, tasks) -> dict[str, float]:
        return dict(self._withheld)

    def plan(self, cg: TaskCgroup, units: int) -> list:
        return []

    def apply(self, cg: TaskCgroup, units: int) -> list:
        self.enforced[cg.name] = units
        return []
