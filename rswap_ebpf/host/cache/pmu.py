"""Cache misses and LLC references per process and cgroup, from ``bpf/pmu.bpf.c``.

Per-CPU hardware counters (``PERF_COUNT_HW_CACHE_MISSES``, ``PERF_COUNT_HW_CACHE_REFERENCES``)
are opened into BPF perf arrays; the sched_switch program charges each slice's growth to the task
switching out.  Where the host has no PMU (most VMs), :meth:`PmuCollector.open` raises
:class:`FeatureMissing` and the Cache resource reports ``missing`` instead of zeros.

``replay=True`` builds the same program with its counter source replaced by a BPF array that user
space fills (``set_counters``); with ``test_run=True`` the handler is not attached and
:meth:`PmuCollector.run_switch` executes it through ``BPF_PROG_TEST_RUN`` on the calling thread, so
tests drive the real accounting with recorded counter values.
"""
from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass, field

from rswap_ebpf.errors import FeatureMissing
from rswap_ebpf.host import bpf

log = logging.getLogger(__name__)

PMU_EVENTS_DIR = "/sys/bus/event_source/devices/cpu/events"
MAPS = ("rswap_pmu_task", "rswap_pmu_cgroup", "rswap_pmu_stats")

# perf_event_open(2): PERF_TYPE_HARDWARE and its generic events.
PERF_TYPE_HARDWARE = 0
PERF_COUNT_HW_CACHE_REFERENCES = 2
PERF_COUNT_HW_CACHE_MISSES = 3
PERF_TYPE_SOFTWARE = 1
PERF_COUNT_SW_CPU_CLOCK = 0
PERF_COUNT_SW_CONTEXT_SWITCHES = 3
#: (type, config) of the two counters: hardware cache misses and LLC references.
HARDWARE_COUNTERS = ((PERF_TYPE_HARDWARE, PERF_COUNT_HW_CACHE_MISSES),
                     (PERF_TYPE_HARDWARE, PERF_COUNT_HW_CACHE_REFERENCES))
#: Stand-ins with the same read path, for measuring the read's cost on hosts without a PMU.
SOFTWARE_COUNTERS = ((PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CONTEXT_SWITCHES),
                     (PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CPU_CLOCK))

_NR_BPF = {"x86_64": 321, "aarch64": 280}
_BPF_PROG_TEST_RUN = 10


def pmu_available(events_dir: str | None = None) -> bool:
    """Whether the CPU PMU advertises a cache-misses event (sysfs, as ``perf list`` reads it)."""
    d = events_dir or os.environ.get("RSWAP_PMU_EVENTS_DIR") or PMU_EVENTS_DIR
    return os.path.exists(os.path.join(d, "cache-misses"))


def pmu_missing() -> FeatureMissing:
    return FeatureMissing("hardware PMU", f"{PMU_EVENTS_DIR}/cache-misses does not exist: this CPU "
                          "(or VM) exposes no cache-miss counters",
                          "run on bare metal, or give the VM a virtual PMU (e.g. -cpu host,pmu=on)")


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

    @property
    def cgroup_misses(self) -> dict[int, int]:
        return {k: v.misses for k, v in self.cgroup.items()}

    def misses_per_s(self, counts: PmuCounts) -> float:
        return counts.misses * 1e9 / self.interval_ns if self.interval_ns > 0 else 0.0


class PmuCollector(bpf.BpfCollector):
    """sched_switch cache-miss accounting; ``sample`` > 1 measures every Nth slice per CPU."""

    SOURCE = "pmu.bpf.c"
    MAPS = MAPS

    def __init__(self, sample: int = 1, replay: bool = False, test_run: bool = False,
                 pin: bool = True, no_read: bool = False,
                 counters: tuple[tuple[int, int], ...] = HARDWARE_COUNTERS):
        if sample < 1:
            raise ValueError("sample must be at least 1")
        super().__init__(pin)
        self.sample = sample
        self.replay = replay or test_run
        self.test_run = test_run
        self.no_read = no_read
        self.counters = counters
        self.attach_point = ""
        self._fn = None

    def flags(self) -> list[str]:
        f = [f"-DRSWAP_PMU_SAMPLE={self.sample}", f"-DRSWAP_NR_CPUS={os.cpu_count() or 1}"]
        if self.replay:
            f.append("-DRSWAP_PMU_REPLAY")
        if self.no_read:
            f.append("-DRSWAP_PMU_NO_READ")
        if self.test_run:
            f.append("-DRSWAP_PMU_TEST_RUN")
            self.attach_point = "BPF_PROG_TEST_RUN"
        else:
            point = bpf.choose_attach_point("sched_switch", bpf.SCHED_SWITCH, bpf.SCHED_SWITCH_FIX)
            f += point.cflags
            self.attach_point = point.name
        return f

    def cflags(self) -> list[str]:
        hardware = self.counters[0][0] == PERF_TYPE_HARDWARE
        if not self.replay and not self.no_read and hardware and not pmu_available():
            raise pmu_missing()
        return self.flags()

    def attach(self) -> None:
        if self.test_run:
            bcc = bpf.import_bcc()
            self._fn = self._bpf.load_func(b"rswap_pmu_switch", bcc.BPF.RAW_TRACEPOINT)
        if not self.replay and not self.no_read:
            self._open_counters()

    def _open_counters(self) -> None:
        for table, (etype, config) in zip(("rswap_pmu_misses", "rswap_pmu_refs"), self.counters):
            try:
                self._bpf[table].open_perf_event(etype, config)
            except Exception as err:  # bcc raises plain Exception when perf_event_open fails
                raise FeatureMissing("hardware PMU", f"perf_event_open(type {etype}, config "
                                     f"{config}) failed: {err}",
                                     "check kernel.perf_event_paranoid and that the CPU has a "
                                     "PMU") from None

    # -- replay ------------------------------------------------------------------------------
    def set_counters(self, misses: int, refs: int) -> None:
        """Replay mode: what the next read of this host's 'counters' returns."""
        t = self.table("rswap_pmu_replay")
        t[t.Key(0)] = t.Leaf(misses)
        t[t.Key(1)] = t.Leaf(refs)

    def run_switch(self) -> None:
        """Test-run mode: execute the sched_switch handler once, as the calling thread.

        ``BPF_PROG_TEST_RUN`` without ``BPF_F_TEST_RUN_ON_CPU`` runs it on the current CPU with
        ``current`` = the caller, so pin the caller to one CPU to stay on one per-CPU state.
        """
        if self._fn is None:
            raise RuntimeError("run_switch needs PmuCollector(test_run=True)")
        attr = (ctypes.c_uint8 * 80)()
        ctypes.c_uint32.from_buffer(attr, 0).value = self._fn.fd
        libc = ctypes.CDLL(None, use_errno=True)
        nr = _NR_BPF.get(os.uname().machine)
        if nr is None:
            raise FeatureMissing("BPF_PROG_TEST_RUN", f"no bpf(2) number known for {os.uname().machine}")
        rc = libc.syscall(nr, _BPF_PROG_TEST_RUN, ctypes.byref(attr), ctypes.sizeof(attr))
        if rc != 0:
            err = ctypes.get_errno()
            raise FeatureMissing("BPF_PROG_TEST_RUN", f"raw tracepoint test run failed: "
                                 f"{os.strerror(err)}", "needs Linux 5.10 or later")

    # -- reading -----------------------------------------------------------------------------
    def drain(self) -> PmuDelta:
        interval = self._interval_ns()
        task = _drain(self.table("rswap_pmu_task"))
        cgroup = _drain(self.table("rswap_pmu_cgroup"))
        dropped = self._counters("rswap_pmu_stats",
                                 ("task_map_full", "cgroup_map_full", "counter_reset"))
        return PmuDelta(interval, task, cgroup, dropped)

    def close(self) -> None:
        super().close()
        self._fn = None


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
