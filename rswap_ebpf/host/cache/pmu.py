"""Cache misses and references per process and cgroup, from ``bpf/pmu.bpf.c``.

Per-CPU hardware counters are opened into BPF perf arrays; the sched_switch program charges each
slice's growth to the task switching out.  Which events (and on which CPUs) is chosen by vendor in
:mod:`rswap_ebpf.host.cache.pmu_events`: LLC misses on Intel (hybrid parts: on the cpu_core and
cpu_atom PMUs), L3 misses as the core sees them on AMD Zen (a raw event: the generic one counts
L2 misses there, and is labelled so where it is the only choice).  A counter that shares the PMU
with more events than it has counters is multiplexed: each slice's growth is scaled by
``time_enabled / time_running`` in BPF, and :attr:`PmuDelta.running_fraction` says how much of
the time the counters really ran.  Where the host has no PMU (most VMs), :meth:`PmuCollector.open` raises
:class:`FeatureMissing` and the Cache resource reports ``missing`` instead of zeros.

``replay=True`` builds the same program with its counter source replaced by a BPF array that user
space fills (``set_counters``), so the real accounting can be driven with recorded counter
values.  How the handler is hooked to sched_switch is :meth:`PmuCollector._attach_flags` and
:meth:`PmuCollector._attached`; tests/kernel/pmu_test_run.py overrides them to run the handler
through ``BPF_PROG_TEST_RUN`` instead.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from rswap_ebpf.errors import FeatureMissing
from rswap_ebpf.host import bpf
from rswap_ebpf.host.cache import pmu_events
from rswap_ebpf.host.cache.pmu_events import pmu_missing  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

PMU_EVENTS_DIR = "/sys/bus/event_source/devices/cpu/events"
MAPS = ("rswap_pmu_task", "rswap_pmu_cgroup", "rswap_pmu_stats", "rswap_pmu_mux")

# perf_event_open(2): PERF_TYPE_HARDWARE and its generic events.
PERF_TYPE_HARDWARE = 0
PERF_COUNT_HW_CACHE_REFERENCES = 2
PERF_COUNT_HW_CACHE_MISSES = 3
PERF_TYPE_SOFTWARE = 1
PERF_COUNT_SW_CPU_CLOCK = 0
PERF_COUNT_SW_CONTEXT_SWITCHES = 3
#: (type, config) of the generic counters (what pmu_events picks on Intel without hybrid PMUs).
HARDWARE_COUNTERS = ((PERF_TYPE_HARDWARE, PERF_COUNT_HW_CACHE_MISSES),
                     (PERF_TYPE_HARDWARE, PERF_COUNT_HW_CACHE_REFERENCES))
#: Stand-ins with the same read path, for measuring the read's cost on hosts without a PMU.
SOFTWARE_COUNTERS = ((PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CONTEXT_SWITCHES),
                     (PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CPU_CLOCK))


def pmu_available() -> bool:
    """Whether this host has a CPU PMU rswap can count cache misses on (``cpu`` with a
    cache-misses event, or the hybrid ``cpu_core``/``cpu_atom``), as sysfs says."""
    try:
        pmu_events.select_events()
    except FeatureMissing:
        return False
    return True


@dataclass(frozen=True)
class PmuCounts:
    misses: int = 0
    refs: int = 0
    slices: int = 0

    @property
    def miss_ratio(self) -> float | None:
        return self.misses / self.refs if self.refs else None


@dataclass(frozen=True)
class PmuDelta:
    """Counts since the previous drain, per tgid and per cgroup2 id."""

    interval_ns: int
    task: dict[int, PmuCounts] = field(default_factory=dict)
    cgroup: dict[int, PmuCounts] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    #: share of the time the counters were on the PMU (< 1: multiplexed, counts are scaled up
    #: by its inverse per slice); None when nothing was read (replay, no read)
    running_fraction: float | None = None

    @property
    def cgroup_misses(self) -> dict[int, int]:
        return {k: v.misses for k, v in self.cgroup.items()}

    def misses_per_s(self, counts: PmuCounts) -> float:
        return counts.misses * 1e9 / self.interval_ns if self.interval_ns > 0 else 0.0


class PmuCollector(bpf.BpfCollector):
    """sched_switch cache-miss accounting; ``sample`` > 1 measures every Nth slice per CPU."""

    SOURCE = "pmu.bpf.c"
    MAPS = MAPS

    def __init__(self, sample: int = 1, replay: bool = False,
                 pin: bool = True, no_read: bool = False,
                 counters: tuple[tuple[int, int], ...] | None = None):
        """``counters``: (type, config) of the miss and reference counters on every online CPU;
        None chooses them for this CPU (:func:`pmu_events.select_events`)."""
        if sample < 1:
            raise ValueError("sample must be at least 1")
        super().__init__(pin)
        self.sample = sample
        self.replay = replay
        self.no_read = no_read
        self.counters = counters
        self.choice: pmu_events.PmuChoice | None = None
        self._mux_last = (0, 0)
        self.attach_point = ""
        self._attach_name = ""
        self._flags: list[str] = []

    def flags(self) -> list[str]:
        f = [f"-DRSWAP_PMU_SAMPLE={self.sample}", f"-DRSWAP_NR_CPUS={pmu_events.cpu_id_limit()}"]
        if self.replay:
            f.append("-DRSWAP_PMU_REPLAY")
        if self.no_read:
            f.append("-DRSWAP_PMU_NO_READ")
        return f + self._attach_flags()

    def _attach_flags(self) -> list[str]:
        """The handler's hook: the first of the sched_switch chain the kernel has (bcc attaches
        the program when it loads)."""
        point = bpf.choose_attach_point("sched_switch", bpf.SCHED_SWITCH, bpf.SCHED_SWITCH_FIX)
        self._attach_name = point.name
        return list(point.cflags)

    def _attached(self, flags: list[str]) -> str:
        """Where the loaded handler runs (status and doctor print it)."""
        return self._attach_name

    def cflags(self) -> list[str]:
        if not self.replay and not self.no_read:
            if self.counters is None:
                self.choice = pmu_events.select_events()   # FeatureMissing without a PMU
            elif self.counters[0][0] == PERF_TYPE_HARDWARE and not pmu_available():
                raise pmu_missing()
        self._flags = self.flags()
        return self._flags

    def attach(self) -> None:
        self.attach_point = self._attached(self._flags)
        if not self.replay and not self.no_read:
            self._open_counters()

    def _open_counters(self) -> None:
        """One counter per CPU id; on a hybrid part each CPU gets its own PMU's event."""
        if self.choice is not None:
            plan = [(g.cpus, ((g.misses.type, g.misses.config), (g.refs.type, g.refs.config)))
                    for g in self.choice.groups]
        else:
            plan = [(pmu_events.online_cpus(), self.counters)]
        for cpus, counters in plan:
            for table, (etype, config) in zip(("rswap_pmu_misses", "rswap_pmu_refs"), counters):
                for cpu in cpus:
                    try:
                        self._bpf[table]._open_perf_event(cpu, etype, config)
                    except Exception as err:  # bcc raises plain Exception on perf_event_open
                        raise FeatureMissing("hardware PMU", f"perf_event_open(type {etype}, "
                                             f"config {config:#x}, cpu {cpu}) failed: {err}",
                                             "check kernel.perf_event_paranoid and that the CPU "
                                             "has a PMU") from None

    # -- replay ------------------------------------------------------------------------------
    def set_counters(self, misses: int, refs: int, enabled_ns: int = 0,
                     running_ns: int = 0) -> None:
        """Replay mode: what the next read of this host's 'counters' returns; ``enabled_ns`` and
        ``running_ns`` are both counters' time_enabled / time_running (0: not multiplexed)."""
        t = self.table("rswap_pmu_replay")
        for i, v in enumerate((misses, refs, enabled_ns, running_ns)):
            t[t.Key(i)] = t.Leaf(v)

    # -- reading -----------------------------------------------------------------------------
    def drain(self) -> PmuDelta:
        interval = self._interval_ns()
        task = _drain(self.table("rswap_pmu_task"))
        cgroup = _drain(self.table("rswap_pmu_cgroup"))
        dropped = self._counters("rswap_pmu_stats",
                                 ("task_map_full", "cgroup_map_full", "counter_reset"))
        return PmuDelta(interval, task, cgroup, dropped, self._running_fraction())

    def _running_fraction(self) -> float | None:
        """time_running / time_enabled of the miss counter over the measured slices since the
        last drain (the BPF side keeps running totals; the difference is this interval's)."""
        t = self.table("rswap_pmu_mux")
        enabled, running = (int(t[t.Key(i)].value) for i in (0, 1))
        last_e, last_r = self._mux_last
        self._mux_last = (enabled, running)
        if enabled <= last_e:
            return None
        return (running - last_r) / (enabled - last_e)


def _drain(table) -> dict[int, PmuCounts]:
    """Sum the per-CPU values of every key, deleting as it goes (batch where the kernel can)."""
    out: dict[int, PmuCounts] = {}
    for k, per_cpu in bpf.drain_table(table):
        key = bpf.key_int(k)
        prev = out.get(key, PmuCounts())
        out[key] = PmuCounts(prev.misses + sum(v.misses for v in per_cpu),
                             prev.refs + sum(v.refs for v in per_cpu),
                             prev.slices + sum(v.slices for v in per_cpu))
    return out


class PmuReplay:
    """Recorded drains played back through the collector's interface (``open``/``drain``/
    ``close``), one :class:`PmuDelta` per drain: the cache driver's accounting and the
    forecasts it feeds run on recorded counters where the host has no PMU.

    ``rows``: per tick, ``{cgroup_id: (misses, refs)}`` over ``interval_ns``.
    """

    def __init__(self, rows, interval_ns: int = 1_000_000_000):
        self.rows = list(rows)
        self.interval_ns = int(interval_ns)

    def open(self) -> PmuReplay:
        return self

    def drain(self) -> PmuDelta:
        if not self.rows:
            raise RuntimeError("the recorded counters are used up")
        row = self.rows.pop(0)
        return PmuDelta(self.interval_ns, {},
                        {int(k): PmuCounts(int(m), int(r), 1) for k, (m, r) in row.items()})

    def close(self) -> None:
        pass
