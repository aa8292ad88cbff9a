"""On-CPU time per process and per cgroup, from ``bpf/cpu.bpf.c`` on ``sched_switch``.

One collector = one BPF program + one class with ``open()``, ``drain()``, ``close()``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from ..errors import FeatureMissing
from . import bpf

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


class CpuCollector:
    """sched_switch accounting; raw tracepoint when the kernel has it, else the tracepoint."""

    def __init__(self, flush_hz: int = FLUSH_HZ, pin: bool = True):
        self.flush_hz = flush_hz
        self.pin = pin
        self.attach_point = ""
        self.flush = False
        self.pinned: list[str] = []
        self._bpf = None
        self._last = 0

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
        if self.pin:
            try:
                for name in MAPS:
                    self.pinned.append(bpf.pin_map(self._bpf.get_table(name.encode()), name))
            except BaseException:
                self.close()
                raise
        self._last = time.monotonic_ns()
        return self

    def drain(self) -> CpuDelta:
        """Look up and delete every entry (one batch syscall per map) since the last drain."""
        if self._bpf is None:
            raise RuntimeError("collector is not open")
        now = time.monotonic_ns()
        tasks = _drain(self._bpf.get_table(b"rswap_task_ns"))
        cgroups = _drain(self._bpf.get_table(b"rswap_cgroup_ns"))
        stats = self._bpf.get_table(b"rswap_stats")
        dropped = {}
        for idx, label in enumerate(("task_map_full", "cgroup_map_full", "stale_delta")):
            v = sum(stats[stats.Key(idx)])
            if v:
                dropped[label] = v
        delta = CpuDelta(now - self._last, tasks, cgroups, dropped)
        self._last = now
        return delta

    def close(self) -> None:
        for path in self.pinned:
            bpf.unpin(path)
        self.pinned = []
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None

    def __enter__(self) -> CpuCollector:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()


def _drain(table) -> dict[int, int]:
    out: dict[int, int] = {}
    try:
        items = table.items_lookup_and_delete_batch()
        for k, v in items:
            key = k if isinstance(k, int) else k.value
            out[key] = out.get(key, 0) + sum(v)
    except Exception:
        # Kernels without BPF_MAP_LOOKUP_AND_DELETE_BATCH: read then delete key by key.
        for k, v in list(table.items()):
            out[k.value] = out.get(k.value, 0) + sum(v)
            try:
                del table[k]
            except KeyError:
                pass
    return out
