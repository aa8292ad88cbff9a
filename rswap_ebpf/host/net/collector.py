"""Bytes and packets per cgroup and interface, from ``bpf/net.bpf.c`` on tc clsact.

One collector = one BPF program + one class with ``open()``, ``drain()``, ``close()``.  Egress is
attributed to the sending socket's cgroup (``bpf_skb_cgroup_id``).  Ingress is attributed per
interface only: at tc ingress the packet has not been matched to a socket yet, so it is counted
under cgroup id 0.  With ``flows=True`` (ifb ingress shaping) the program also learns each
classified socket's flow at egress and gives incoming packets of that flow the task's HTB class.  The program also carries the HTB classification (``rswap_net_class``), which
:meth:`NetCollector.class_map` hands to the tc enforcer.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from rswap_ebpf.host.net import tc as tcmod
from rswap_ebpf.host.journal import Journal
from rswap_ebpf.host import bpf

MAPS = ("rswap_net_bytes", "rswap_net_class", "rswap_net_stats")
INGRESS, EGRESS = 0, 1


@dataclass(frozen=True)
class NetCounts:
    packets: int = 0
    bytes: int = 0

    def __add__(self, o: NetCounts) -> NetCounts:
        return NetCounts(self.packets + o.packets, self.bytes + o.bytes)


@dataclass(frozen=True)
class NetDelta:
    """Counts since the previous drain, keyed ``(cgroup id, ifindex, direction)``."""

    interval_ns: int
    counts: dict[tuple[int, int, int], NetCounts] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)

    def for_cgroups(self, ids: set[int], ifindex: int | None = None,
                    direction: int = EGRESS) -> NetCounts:
        total = NetCounts()
        for (cg, idx, d), c in self.counts.items():
            if cg in ids and d == direction and (ifindex is None or idx == ifindex):
                total = total + c
        return total

    def ingress(self, ifindex: int) -> NetCounts:
        return self.for_cgroups({0}, ifindex, INGRESS)

    def bytes_per_s(self, c: NetCounts) -> float:
        return c.bytes * 1e9 / self.interval_ns if self.interval_ns > 0 else 0.0


class BccClassMap:
    """:class:`rswap_ebpf.host.net.htb.ClassMap` over the loaded program's ``rswap_net_class``."""

    def __init__(self, table):
        self.table = table

    def set(self, cgroup_id: int, classid: int) -> None:
        self.table[self.table.Key(cgroup_id)] = self.table.Leaf(classid)

    def remove(self, cgroup_id: int) -> None:
        try:
            del self.table[self.table.Key(cgroup_id)]
        except KeyError:
            pass

    def items(self) -> dict[int, int]:
        return {k.value: v.value for k, v in self.table.items()}


class NetCollector(bpf.BpfCollector):
    """clsact ingress/egress cls_bpf accounting on the given interfaces."""

    SOURCE = "net.bpf.c"

    def __init__(self, interfaces: Sequence[tcmod.Iface], journal: Journal | None = None,
                 pin: bool = True, ingress: bool = True, flows: bool = False):
        super().__init__(pin)
        self.interfaces = list(interfaces)
        self.journal = journal
        self.ingress = ingress
        #: learn flows at egress and classify ingress by them (ifb ingress shaping)
        self.flows = flows
        self.MAPS = MAPS + (("rswap_net_flow",) if flows else ())
        self.ifindex: dict[tcmod.Iface, int] = {}
        self._attached: list[tuple[tcmod.Iface, bool]] = []
        self._fns: dict[str, object] = {}

    def cflags(self) -> list[str]:
        return ["-DRSWAP_NET_FLOWS"] if self.flows else []

    def attach(self) -> None:
        bcc = bpf.import_bcc()
        for fn in ("rswap_tc_egress", "rswap_tc_ingress"):
            self._fns[fn] = self._bpf.load_func(fn.encode(), bcc.BPF.SCHED_CLS)
        for iface in self.interfaces:
            with tcmod.ipr(iface) as ip:
                self.ifindex[iface] = tcmod.ifindex(ip, iface)
                had = any(tcmod._kind(q) == "clsact" for q in tcmod._qdiscs(ip, self.ifindex[iface]))
            self._attached.append((iface, not had))
            tcmod.attach_bpf(self.journal, iface,
                             self._fns["rswap_tc_ingress"].fd if self.ingress else None,
                             self._fns["rswap_tc_egress"].fd)

    def class_map(self) -> BccClassMap:
        return BccClassMap(self.table("rswap_net_class"))

    def drain(self) -> NetDelta:
        interval = self._interval_ns()
        counts: dict[tuple[int, int, int], NetCounts] = {}
        for k, v in bpf.drain_table(self.table("rswap_net_bytes")):
            key = (int(k.cgid), int(k.ifindex), int(k.dir))
            c = NetCounts(sum(x.packets for x in v), sum(x.bytes for x in v))
            counts[key] = counts.get(key, NetCounts()) + c
        return NetDelta(interval, counts, self._counters("rswap_net_stats", ("", "map_full")))

    def close(self) -> None:
        for iface, created in self._attached:
            tcmod.detach_bpf(iface, remove_clsact=created)
        self._attached = []
        self._fns = {}
        super().close()
