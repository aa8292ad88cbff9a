"""Block requests per process, per cgroup and per device, from ``bpf/block.bpf.c``.

One collector = one BPF program + one class with ``open()``, ``drain()``, ``close()``.  Requests are
charged when they are issued (completion runs in interrupt context, with no meaningful ``current``);
the completion adds the service time to the owner remembered at issue.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from rswap_ebpf.errors import FeatureMissing
from rswap_ebpf.host import bpf

MAPS = ("rswap_io_task", "rswap_io_cgroup", "rswap_io_stats")
#: Issue and completion hooks, probed in order (the way bcc's biolatency picks its attach point).
#: Raw tracepoints are not offered: they hand over ``struct request *``, whose fields rswap must not
#: read with headers from another kernel.
ISSUE_POINTS = (("block", "block_rq_issue"),)
COMPLETE_POINTS = (("block", "block_rq_complete"),)
#: Request allocation, in the submitter's context: who a request belongs to when kblockd issues it.
OWNER_POINT = ("block", "block_getrq")
TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


def kdev(major: int, minor: int) -> int:
    """The kernel's internal dev_t (``MAJOR << 20 | MINOR``), as tracepoints report it."""
    return (major << 20) | minor


@dataclass(frozen=True)
class IoCounts:
    """Requests and bytes issued, and service time of those completed, over one interval."""

    reads: int = 0
    writes: int = 0
    other: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    completed: int = 0
    service_ns: int = 0

    @property
    def requests(self) -> int:
        """Data requests (reads + writes): what an IOPS limit counts."""
        return self.reads + self.writes

    def __add__(self, o: IoCounts) -> IoCounts:
        return IoCounts(*(a + b for a, b in zip(_fields(self), _fields(o))))


def _fields(c: IoCounts) -> tuple[int, ...]:
    return (c.reads, c.writes, c.other, c.read_bytes, c.write_bytes, c.completed, c.service_ns)


@dataclass(frozen=True)
class IoDelta:
    """Counts since the previous drain, keyed ``(tgid, dev)`` and ``(cgroup id, dev)``.

    ``dev`` is the kernel dev_t (see :func:`kdev`).
    """

    interval_ns: int
    task: dict[tuple[int, int], IoCounts] = field(default_factory=dict)
    cgroup: dict[tuple[int, int], IoCounts] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)

    def per_device(self) -> dict[int, IoCounts]:
        out: dict[int, IoCounts] = {}
        for (_, dev), c in self.cgroup.items():
            out[dev] = out.get(dev, IoCounts()) + c
        return out

    def for_cgroups(self, ids: set[int], dev: int | None = None) -> IoCounts:
        total = IoCounts()
        for (cg, d), c in self.cgroup.items():
            if cg in ids and (dev is None or d == dev):
                total = total + c
        return total

    def iops(self, counts: IoCounts) -> float:
        return counts.requests * 1e9 / self.interval_ns if self.interval_ns > 0 else 0.0


def tracepoint_has_field(category: str, event: str, name: str) -> bool:
    """Like bcc's ``kernel_struct_has_field``, for a tracepoint's format file."""
    for d in TRACEFS_DIRS:
        fmt = os.path.join(d, "events", category, event, "format")
        try:
            with open(fmt) as f:
                text = f.read()
        except OSError:
            continue
        return any(line.strip().startswith("field:") and
                   line.split(";")[0].split()[-1].split("[")[0] == name
                   for line in text.splitlines())
    return False


class BlockCollector(bpf.BpfCollector):
    """block_rq_issue / block_rq_complete accounting."""

    SOURCE = "block.bpf.c"
    MAPS = MAPS

    def __init__(self, pin: bool = True):
        super().__init__(pin)
        self.attach_points: tuple[str, ...] = ()

    @staticmethod
    def probe() -> tuple[tuple[str, str], tuple[str, str], tuple[str, str] | None, list[str]]:
        """The issue, completion and owner tracepoints to use, and the cflags they need.

        Fields are checked in tracefs' format files of the running kernel, not assumed: 6.1 and
        6.18 differ (``rwbs[8]`` against ``rwbs[10]`` and ``ioprio``), and bcc builds ``args`` from
        the same files.  Without ``block_getrq`` (dev, sector) requests are charged to ``current``
        at issue, which is kblockd for requests flushed from a plug when the submitter slept.
        """
        issue = next((p for p in ISSUE_POINTS if bpf.tracepoint_exists(*p)), None)
        complete = next((p for p in COMPLETE_POINTS if bpf.tracepoint_exists(*p)), None)
        if issue is None or complete is None:
            missing = ", ".join(":".join(p) for p in (ISSUE_POINTS + COMPLETE_POINTS)
                                if not bpf.tracepoint_exists(*p))
            raise FeatureMissing("block tracepoints", f"{missing} not available",
                                 "mount tracefs (mount -t tracefs tracefs /sys/kernel/tracing); "
                                 "the kernel needs CONFIG_BLK_DEV_IO_TRACE or CONFIG_TRACEPOINTS")
        flags = []
        if not tracepoint_has_field(*issue, "bytes"):
            flags.append("-DRSWAP_RQ_NO_BYTES")  # kernels before 4.x: bytes = nr_sector * 512
        owner = OWNER_POINT if (bpf.tracepoint_exists(*OWNER_POINT) and
                                tracepoint_has_field(*OWNER_POINT, "sector")) else None
        if owner is not None:
            flags.append("-DRSWAP_OWNER_AT_GETRQ")
        return issue, complete, owner, flags

    def cflags(self) -> list[str]:
        issue, complete, owner, flags = self.probe()
        self.attach_points = tuple(f"tracepoint:{':'.join(p)}" for p in (issue, complete, owner) if p)
        return flags

    def drain(self) -> IoDelta:
        interval = self._interval_ns()
        task = _drain(self.table("rswap_io_task"))
        cgroup = _drain(self.table("rswap_io_cgroup"))
        dropped = self._counters("rswap_io_stats",
                                 ("task_map_full", "cgroup_map_full", "stale_request"))
        return IoDelta(interval, task, cgroup, dropped)


def _counts(percpu) -> IoCounts:
    return IoCounts(sum(v.reads for v in percpu), sum(v.writes for v in percpu),
                    sum(v.other for v in percpu), sum(v.read_bytes for v in percpu),
                    sum(v.write_bytes for v in percpu), sum(v.completed for v in percpu),
                    sum(v.service_ns for v in percpu))


def _drain(table) -> dict[tuple[int, int], IoCounts]:
    out: dict[tuple[int, int], IoCounts] = {}
    for k, v in bpf.drain_table(table):
        key = (int(k.id), int(k.dev))
        out[key] = out.get(key, IoCounts()) + _counts(v)
    return out
