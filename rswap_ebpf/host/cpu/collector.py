"""On-CPU time per process and per cgroup, from ``bpf/cpu.bpf.c`` on ``sched_switch``.

One collector = one BPF program + one class with ``open()``, ``drain()``, ``close()``.
"""
from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field

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
    """sched_switch accounting; raw tracepoint when the kernel has it, else the tracepoint.

    Cgroups are always accounted; a process (tgid) only once :meth:`watch` names it, as a task
    configured by pid needs: the per-CPU fast path keys on the cgroup alone, and a switch between
    two processes of one cgroup touches no hash.  Where the kernel cannot run a program on a
    given CPU (``BPF_F_TEST_RUN_ON_CPU``, Linux 5.10) the program is rebuilt to charge the hashes
    at every switch (``mode`` says which runs).
    """

    SOURCE = "cpu.bpf.c"
    MAPS = MAPS

    def __init__(self, flush_hz: int = FLUSH_HZ, pin: bool = True):
        super().__init__(pin)
        self.flush_hz = flush_hz
        self.attach_point = ""
        self.flush = False
        #: "per-cpu cache" (sums kept per CPU, synced at each drain) or "direct"
        self.mode = ""
        self._direct = False
        self._sync = None
        self._cpus: list[int] = []
        self._watched: set[int] = set()

    def cflags(self) -> list[str]:
        point = bpf.choose_attach_point("sched_switch", bpf.SCHED_SWITCH, bpf.SCHED_SWITCH_FIX)
        self.attach_point = point.name
        return list(point.cflags) + (["-DRSWAP_CPU_DIRECT"] if self._direct else [])

    def open(self) -> CpuCollector:
        try:
            return super().open()
        except _NoSyncOnCpu as err:
            log.warning("cannot run BPF programs on a chosen CPU (%s): charging the maps at "
                        "every switch instead (slower)", err)
            self._direct = True
            return super().open()

    def attach(self) -> None:
        bcc = bpf.import_bcc()
        self.mode = "direct" if self._direct else "per-cpu cache"
        if not self._direct:
            self._sync = self._bpf.load_func(b"rswap_cpu_sync", bcc.BPF.RAW_TRACEPOINT)
            self._cpus = bpf.online_cpus()
            try:
                self._sync_cpus()
            except OSError as err:
                raise _NoSyncOnCpu(err.strerror) from None
        self._publish_watch(self._watched, add=True)
        if not self.flush_hz:
            return
        try:
            self._bpf.attach_perf_event(ev_type=bcc.PerfType.SOFTWARE,
                                        ev_config=bcc.PerfSWConfig.CPU_CLOCK,
                                        fn_name=b"rswap_cpu_flush", sample_freq=self.flush_hz)
            self.flush = True
        except Exception as err:
            log.warning("software perf events unavailable (%s): a task never switched out "
                        "is charged only at its next switch or drain", err)

    def watch(self, *tgids: int) -> None:
        """Account these processes by tgid too (``CpuDelta.task_ns``), from now on."""
        self._watched.update(int(t) for t in tgids)
        if self._bpf is not None:
            self._publish_watch({int(t) for t in tgids}, add=True)

    def unwatch(self, *tgids: int) -> None:
        self._watched.difference_update(int(t) for t in tgids)
        if self._bpf is not None:
            self._publish_watch({int(t) for t in tgids}, add=False)

    def _publish_watch(self, tgids: set[int], add: bool) -> None:
        watch = self.table("rswap_cpu_watch")
        for tgid in tgids:
            if add:
                watch[watch.Key(tgid)] = watch.Leaf(1)
            else:
                try:
                    del watch[watch.Key(tgid)]
                except KeyError:
                    pass
        ctl = self.table("rswap_cpu_ctl")
        ctl[ctl.Key(0)] = ctl.Leaf(len(self._watched))
        self._sync_cpus()  # every CPU looks its current tgid up again

    def _sync_cpus(self) -> None:
        """Charge each CPU's running task up to now and move its sums into the hashes."""
        if self._sync is None:
            return
        for cpu in self._cpus:
            try:
                bpf.test_run_on_cpu(self._sync.fd, cpu)
            except OSError as err:
                if err.errno != errno.ENXIO:  # offline now: its sums wait for it to come back
                    raise

    def drain(self) -> CpuDelta:
        """Every nanosecond charged up to now since the last drain (one batch syscall per map,
        after one program run per CPU)."""
        interval = self._interval_ns()
        self._sync_cpus()
        tasks = _drain(self.table("rswap_task_ns"))
        cgroups = _drain(self.table("rswap_cgroup_ns"))
        dropped = self._counters("rswap_stats", ("task_map_full", "cgroup_map_full", "stale_delta"))
        return CpuDelta(interval, tasks, cgroups, dropped)

    def close(self) -> None:
        super().close()
        self._sync = None


class _NoSyncOnCpu(Exception):
    """The kernel refused BPF_F_TEST_RUN_ON_CPU: rebuild the program in direct mode."""


def _drain(table) -> dict[int, int]:
    out: dict[int, int] = {}
    for k, v in bpf.drain_table(table):
        key = bpf.key_int(k)
        out[key] = out.get(key, 0) + sum(v)
    return out
