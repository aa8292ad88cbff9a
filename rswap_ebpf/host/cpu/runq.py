"""Run-queue delay per cgroup (sched_wakeup/_new + sched_switch), from ``bpf/runq.bpf.c`` or,
beside the CPU collector, from the run-queue half of its ``bpf/cpu.bpf.c``.

The time a task waits runnable before it runs is what a co-located batch job costs a
latency-critical service on the CPU, seen without instrumenting the service (Heracles and
PARTIES read the service's own latency instead).  One collector = one BPF program + this class
with ``open()``, ``drain()``, ``close()``; the histogram maps are pinned with the others.

PSI (``cpu.pressure``) would say the same per cgroup where cgroup v2 runs the cpu controller;
:func:`cpu_pressure_some_us` reads it there and returns None elsewhere (this host's hybrid
layout has no ``cpu.pressure`` in the v1 cpu hierarchy).
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from rswap_ebpf.errors import FeatureMissing
from rswap_ebpf.host import bpf
from rswap_ebpf.host.cpu.collector import RUNQ_SLOTS, RUNQ_WAKEUPS, CpuCollector

MAPS = ("rswap_runq_hist", "rswap_runq_ns", "rswap_runq_stats")
#: log2 slots kept per cgroup (slot s counts delays below 2**s microseconds)
SLOTS = RUNQ_SLOTS
#: the drop counters of ``rswap_runq_stats``, by index (bpf/rswap.h)
DROPS = ("runq_stamp_overwritten", "runq_hist_full")


@dataclass(frozen=True)
class RunqHistogram:
    """Counts of run-queue delays by log2 slot (slot ``s``: below ``2**s`` µs) and their sum."""

    counts: tuple[int, ...] = (0,) * SLOTS
    total_ns: int = 0

    @property
    def n(self) -> int:
        return sum(self.counts)

    def merged(self, other: RunqHistogram) -> RunqHistogram:
        return RunqHistogram(tuple(a + b for a, b in zip(self.counts, other.counts)),
                             self.total_ns + other.total_ns)

    def quantile_us(self, q: float) -> float:
        """The upper bound of the slot holding quantile ``q`` (0 when empty).

        >>> RunqHistogram((0, 90, 0, 0, 0, 10) + (0,) * 20).quantile_us(0.5)
        2.0
        >>> RunqHistogram((0, 90, 0, 0, 0, 10) + (0,) * 20).quantile_us(0.99)
        32.0
        """
        n = self.n
        if n == 0:
            return 0.0
        rank, seen = q * n, 0
        for slot, c in enumerate(self.counts):
            seen += c
            if seen >= rank and c:
                return float(2 ** slot)
        return float(2 ** (len(self.counts) - 1))

    def mean_us(self) -> float:
        return self.total_ns / self.n / 1000 if self.n else 0.0


@dataclass(frozen=True)
class RunqDelta:
    """Run-queue delays charged since the previous drain, per cgroup2 id."""

    interval_ns: int
    cgroups: dict[int, RunqHistogram] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)

    def of(self, cgroup_ids: Iterable[int]) -> RunqHistogram:
        out = RunqHistogram()
        for i in cgroup_ids:
            h = self.cgroups.get(i)
            if h is not None:
                out = out.merged(h)
        return out


def histograms(hist_items: Iterable[tuple[int, int, int]],
               sums: Mapping[int, int]) -> dict[int, RunqHistogram]:
    """(cgroup id, slot, count) rows and per-cgroup sums -> one histogram per cgroup."""
    counts: dict[int, list[int]] = {}
    for cgid, slot, n in hist_items:
        row = counts.setdefault(cgid, [0] * SLOTS)
        row[min(max(int(slot), 0), SLOTS - 1)] += n
    ids = set(counts) | set(sums)
    return {i: RunqHistogram(tuple(counts.get(i, [0] * SLOTS)), int(sums.get(i, 0))) for i in ids}


class RunqCollector(bpf.BpfCollector):
    """runqlat per cgroup: the tracepoints ``sched:sched_wakeup``, ``sched_wakeup_new`` and
    ``sched_switch`` (their arguments only).

    Beside an open :class:`CpuCollector` whose program carries the run-queue half (``share``,
    or else the newest one open in this process), it turns that half on instead of loading a
    program of its own, so one program runs per context switch, not two; alone it loads
    ``bpf/runq.bpf.c``.  ``mode`` says which ("shared with cpu.bpf.c" or "runq.bpf.c").  Either
    way the histogram maps are pinned under the same names.
    """

    SOURCE = "runq.bpf.c"
    MAPS = MAPS
    EVENTS = ("sched_wakeup", "sched_wakeup_new", "sched_switch")

    def __init__(self, pin: bool = True, share: CpuCollector | None = None, alone: bool = False):
        super().__init__(pin)
        self.share = share
        self.alone = alone
        self.mode = ""
        self.attach_point = ""
        self._host: CpuCollector | None = None

    def cflags(self) -> list[str]:
        point = bpf.choose_attach_point("sched_switch", bpf.SCHED_SWITCH, bpf.SCHED_SWITCH_FIX)
        if not bpf.sched_switch_has_prev_state(point):
            point = bpf.SCHED_SWITCH[-1]  # tracefs' event: it has prev_state
        self.attach_point = point.name
        return [*point.cflags, f"-DRSWAP_RUNQ_SLOTS={SLOTS}"]

    def open(self) -> RunqCollector:
        missing = [e for e in self.EVENTS if not bpf.tracepoint_exists("sched", e)]
        if missing:
            raise FeatureMissing("run-queue delay", "tracefs lacks sched:" + ", sched:".join(missing),
                                 "mount tracefs: mount -t tracefs tracefs /sys/kernel/tracing")
        host = None if self.alone else (self.share or CpuCollector.runq_host())
        if host is None or not host.runq_half:
            self.mode = "runq.bpf.c"
            return super().open()
        host.share_runq()
        self._host, self._bpf = host, host._bpf
        self.mode, self.attach_point = "shared with cpu.bpf.c", host.attach_point
        try:
            self._pin_maps()
        except BaseException:
            self.close()
            raise
        self._start_clock()
        return self

    def attach(self) -> None:
        for tp, fn in RUNQ_WAKEUPS:
            self._bpf.attach_tracepoint(tp=tp.encode(), fn_name=fn.encode())

    def drain(self) -> RunqDelta:
        if self._host is not None and self._host._bpf is None:
            raise RuntimeError("the CPU collector this run-queue collector shared is closed: "
                               "close the run-queue collector first")
        interval = self._interval_ns()
        if self._host is not None:
            self._host.sync()  # the delays still in its per-CPU slots
        rows = []
        for k, v in bpf.drain_table(self.table("rswap_runq_hist")):
            rows.append((int(k.cgroup_id), int(k.slot), sum(v)))
        sums: dict[int, int] = {}
        for k, v in bpf.drain_table(self.table("rswap_runq_ns")):
            key = bpf.key_int(k)
            sums[key] = sums.get(key, 0) + sum(v)
        dropped = self._counters("rswap_runq_stats", DROPS)
        return RunqDelta(interval, histograms(rows, sums), dropped)

    def close(self) -> None:
        host, self._host = self._host, None
        if host is None:
            super().close()
            return
        for path in self.pinned:
            bpf.unpin(path)
        self.pinned = []
        self._bpf = None
        host.unshare_runq()  # the program and its maps stay the CPU collector's


def cpu_pressure_some_us(cgroup_dir: str | None) -> int | None:
    """``some total=`` of a cgroup v2 ``cpu.pressure`` (µs stalled so far); None without PSI."""
    if not cgroup_dir:
        return None
    try:
        with open(os.path.join(cgroup_dir, "cpu.pressure")) as f:
            for line in f:
                if line.startswith("some "):
                    for part in line.split():
                        if part.startswith("total="):
                            return int(part[6:])
    except (OSError, ValueError):
        return None
    return None
