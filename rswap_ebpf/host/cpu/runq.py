"""Run-queue delay per cgroup, from ``bpf/runq.bpf.c`` (sched_wakeup/_new + sched_switch).

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

MAPS = ("rswap_runq_hist", "rswap_runq_ns", "rswap_runq_stats")
#: log2 slots kept per cgroup (slot s counts delays below 2**s microseconds)
SLOTS = 26


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
    ``sched_switch`` (their arguments only), loadable on its own beside ``cpu.bpf.c``."""

    MAPS = MAPS
    EVENTS = ("sched_wakeup", "sched_wakeup_new", "sched_switch")

    def program_text(self) -> str:
        return (bpf.bpf_source_dir() / "runq.bpf.c").read_text()

    def open(self) -> RunqCollector:
        missing = [e for e in self.EVENTS if not bpf.tracepoint_exists("sched", e)]
        if missing:
            raise FeatureMissing("run-queue delay", "tracefs lacks sched:" + ", sched:".join(missing),
                                 "mount tracefs: mount -t tracefs tracefs /sys/kernel/tracing")
        self._bpf = bpf.load("runq.bpf.c", [f"-DRSWAP_RUNQ_SLOTS={SLOTS}"])
        self._pin_maps()
        self._start_clock()
        return self

    def drain(self) -> RunqDelta:
        interval = self._interval_ns()
        rows = []
        for k, v in bpf.drain_table(self.table("rswap_runq_hist")):
            rows.append((int(k.cgroup_id), int(k.slot), sum(v)))
        sums: dict[int, int] = {}
        for k, v in bpf.drain_table(self.table("rswap_runq_ns")):
            key = bpf.key_int(k)
            sums[key] = sums.get(key, 0) + sum(v)
        dropped = self._counters("rswap_runq_stats", ("runq_start_full", "runq_hist_full"))
        return RunqDelta(interval, histograms(rows, sums), dropped)


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
