"""On-CPU time per process and per cgroup, from ``bpf/cpu.bpf.c`` on ``sched_switch``.

One collector = one BPF program + one class with ``open()``, ``drain()``, ``close()``.
"""
from __future__ import annotations

import errno
import logging
import weakref
from dataclasses import dataclass, field

from rswap_ebpf.host import bpf

log = logging.getLogger(__name__)

#: How often the flush event charges a task that is never switched out (per CPU, Hz).
FLUSH_HZ = 20
MAPS = ("rswap_task_ns", "rswap_cgroup_ns", "rswap_stats")
#: log2 slots of the run-queue histogram (runq.SLOTS says the same; kept here to avoid a cycle)
RUNQ_SLOTS = 26
#: The wakeup programs of the run-queue half (bpf/rswap.h), by tracepoint.
RUNQ_WAKEUPS = (("sched:sched_wakeup", "rswap_runq_wakeup"),
                ("sched:sched_wakeup_new", "rswap_runq_wakeup_new"))


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

    With ``runq`` (the default) the program carries the switch half of the run-queue delay
    probe too, off until a :class:`~rswap_ebpf.host.cpu.runq.RunqCollector` opened in this
    process shares it (:meth:`share_runq`): then one program per switch serves both.  It is
    left out where the raw tracepoint lacks ``prev_state`` (before Linux 5.18).
    """

    SOURCE = "cpu.bpf.c"
    MAPS = MAPS
    #: open collectors whose program carries the run-queue half (newest last)
    _runq_hosts: list[weakref.ref] = []

    def __init__(self, flush_hz: int = FLUSH_HZ, pin: bool = True, runq: bool = True):
        super().__init__(pin)
        self.flush_hz = flush_hz
        self.runq = runq
        self.attach_point = ""
        self.flush = False
        #: "per-cpu cache" (sums kept per CPU, synced at each drain) or "direct"
        self.mode = ""
        #: whether the loaded program carries the run-queue half
        self.runq_half = False
        self.runq_shared = False
        self._runq_links: list[str] = []
        self._runq_used = False
        self._direct = False
        self._sync = None
        self._cpus: list[int] = []
        self._watched: set[int] = set()

    def cflags(self) -> list[str]:
        point = bpf.choose_attach_point("sched_switch", bpf.SCHED_SWITCH, bpf.SCHED_SWITCH_FIX)
        self.attach_point = point.name
        self.runq_half = self.runq and bpf.sched_switch_has_prev_state(point)
        return (list(point.cflags) + (["-DRSWAP_CPU_DIRECT"] if self._direct else [])
                + (["-DRSWAP_RUNQ", f"-DRSWAP_RUNQ_SLOTS={RUNQ_SLOTS}"] if self.runq_half else []))

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
        if self.runq_half:
            CpuCollector._runq_hosts.append(weakref.ref(self))

    @classmethod
    def runq_host(cls) -> CpuCollector | None:
        """The newest open collector of this process whose program can serve a run-queue
        collector and serves none yet."""
        for ref in reversed(cls._runq_hosts):
            col = ref()
            if col is not None and col._bpf is not None and not col.runq_shared:
                return col
        return None

    def share_runq(self) -> None:
        """Run the run-queue half from now on: attach the wakeup programs, turn the switch half
        on.  Its maps (``rswap_runq_*``) are then this collector's :meth:`table`."""
        if not self.runq_half or self._bpf is None:
            raise RuntimeError("this CPU collector's program has no run-queue half")
        if self._runq_used:  # stamps from the previous time would read as delays
            self.table("rswap_runq_stamp").clear()
        for tp, fn in RUNQ_WAKEUPS:
            self._bpf.attach_tracepoint(tp=tp.encode(), fn_name=fn.encode())
            self._runq_links.append(tp)
        self.runq_shared = self._runq_used = True
        self._publish_ctl()

    def unshare_runq(self) -> None:
        """Stop the run-queue half (what it counted since the last sync stays in the maps)."""
        if self._bpf is None:
            return
        self.runq_shared = False
        self._publish_ctl()
        while self._runq_links:
            self._bpf.detach_tracepoint(tp=self._runq_links.pop().encode())

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
        self._publish_ctl()

    def _publish_ctl(self) -> None:
        ctl = self.table("rswap_cpu_ctl")
        ctl[ctl.Key(0)] = ctl.Leaf(len(self._watched), int(self.runq_shared))
        self._sync_cpus()  # every CPU looks its current tgid up again

    def sync(self) -> None:
        """Move every CPU's pending sums (CPU time, run-queue delays) into the hashes now."""
        self._sync_cpus()

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
        CpuCollector._runq_hosts[:] = [r for r in CpuCollector._runq_hosts
                                       if r() is not None and r() is not self]
        self.runq_shared = False
        self._runq_links = []
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
