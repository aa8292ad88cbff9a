"""On-CPU time per process and per cgroup, from ``bpf/cpu.bpf.c`` on ``sched_switch``.

One collector = one BPF program + one class with ``open()``, ``drain()``, ``close()``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from rswap_ebpf.errors import FeatureMissing
from rswap_ebpf.host import bpf

log = logging.getLogger(__name__)

#: How often the flush event charges a task that is never switched out (per CPU, Hz).
FLUSH_HZ = 20
MAPS = ("rswap_task_ns", "rswap_cgroup_ns", "rswap_stats")


@dataclass(frozen=True)
class CpuDelta:
    """On-CPU nanoseconds since the previous drain."""

    interval_ns: int
    task_ns: dict[int, int] = field(default_factory=dict)
    cgroup_ns: dict[int, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)

    def millicores(self, ns: int) -> float:
        return ns * 1000.0 / self.interval_ns if self.interval_ns > 0 else 0.0


class CpuCollector(bpf.BpfCollector):
    """sched_switch accounting; raw tracepoint when the kernel has it, else the tracepoint."""

    MAPS = MAPS

    def __init__(self, flush_hz: int = FLUSH_HZ, pin: bool = True):
        super().__init__(pin)
        self.flush_hz = flush_hz
        self.attach_point = ""
        self.flush = False

    def program_text(self) -> str:
        return (bpf.bpf_source_dir() / "cpu.bpf.c").read_text()

    def open(self) -> CpuCollector:
        if bpf.raw_tracepoint_supported():
            flags, self.attach_point = ["-DRSWAP_RAW_TP"], "raw_tracepoint:sched_switch"
        elif bpf.tracepoint_exists("sched", "sched_switch"):
            flags, self.attach_point = [], "tracepoint:sched:sched_switch"
        else:
            raise FeatureMissing("sched_switch", "neither the raw tracepoint nor tracefs' "
                                 "sched:sched_switch is available",
                                 "mount tracefs: mount -t tracefs tracefs /sys/kernel/tracing")
        self._bpf = bpf.load("cpu.bpf.c", flags)
        bcc = bpf.import_bcc()
        if self.flush_hz:
            try:
                self._bpf.attach_perf_event(ev_type=bcc.PerfType.SOFTWARE,
                                            ev_config=bcc.PerfSWConfig.CPU_CLOCK,
                                            fn_name=b"rswap_cpu_flush", sample_freq=self.flush_hz)
                self.flush = True
            except Exception as err:
                log.warning("software perf events unavailable (%s): a task never switched out "
                            "is charged only at its next switch", err)
        self._pin_maps()
        self._start_clock()
        return self

    def drain(self) -> CpuDelta:
        """Look up and delete every entry (one batch syscall per map) since the last drain."""
        interval = self._interval_ns()
        tasks = _drain(self.table("rswap_task_ns"))
        cgroups = _drain(self.table("rswap_cgroup_ns"))
        dropped = self._counters("rswap_stats", ("task_map_full", "cgroup_map_full", "stale_delta"))
        return CpuDelta(interval, tasks, cgroups, dropped)


def _drain(table) -> dict[int, int]:
    out: dict[int, int] = {}
    for k, v in bpf.drain_table(table):
        key = bpf.key_int(k)
        out[key] = out.get(key, 0) + sum(v)
    return out
