"""Network bandwidth: tc clsact BPF accounting + one HTB class per task on one interface.

With ``[resources.net] ingress = true`` a task's allocation also caps what it receives: the
interface's ingress goes through an ifb with the same class per task (classified per flow, see
:class:`rswap_ebpf.host.net.ingress.IngressShaper`).  Usage, and so the forecast, is egress bytes/s.

By tier (:class:`rswap_ebpf.host.net.htb.HtbEnforcer`): a critical task's class may borrow the
whole link and is served first; other tasks' classes borrow only what no task's rate holds.
"""
from __future__ import annotations

from collections.abc import Mapping

from rswap_ebpf.host.cgroup import TaskCgroup
from rswap_ebpf.host.net.htb import HtbClass, HtbEnforcer
from rswap_ebpf.host.net.ingress import IngressShaper
from rswap_ebpf.host.net.tc import Iface, link_speed_bytes_per_s
from rswap_ebpf.errors import ConfigError
from rswap_ebpf.model.resources import ResourceType
from rswap_ebpf.host.net.collector import EGRESS, NetCollector
from rswap_ebpf.host.driver import DriverContext, ReportsDrops, ResourceDriver, ShapesByTier

NET = ResourceType.NETWORK_BANDWIDTH


class NetDriver(ResourceDriver, ReportsDrops, ShapesByTier):
    """Egress bytes/s per task on ``iface``; HTB rate = allocation, ceil and prio by tier."""

    resource = NET

    def __init__(self, ctx: DriverContext, iface: Iface, tasks: set[str]):
        self.iface = iface
        self.tasks = tasks
        self.journal = ctx.journal
        self.dry_run = ctx.dry_run
        configured = ctx.config.totals.get(NET) if ctx.config is not None else None
        self._total = configured or link_speed_bytes_per_s(iface)
        options = ctx.config.options.get(NET, {}) if ctx.config is not None else {}
        self.ingress = bool(options.get("ingress", False))
        self.collector = NetCollector([iface], journal=ctx.journal, flows=self.ingress)
        self.htb: HtbEnforcer | None = None
        self.ingress_shaper: IngressShaper | None = None
        self.last_dropped: dict[str, int] = {}
        self.tier_of: dict[str, str] = {}
        self.max_units: dict[str, int] = {}

    def set_priority(self, task: str, priority: str) -> None:
        self.tier_of[task] = str(priority).lower()
        self._shape(task)

    def set_limit(self, task: str, max_units: int | None) -> None:
        if max_units is None:
            self.max_units.pop(task, None)
        else:
            self.max_units[task] = int(max_units)
        self._shape(task)

    def _shape(self, task: str) -> None:
        """The egress HTB holds the tiers; the ingress shaper's HTB shares them."""
        if self.htb is not None:
            self.htb.set_tier(task, self.tier_of.get(task, "normal"), self.max_units.get(task))

    def total(self) -> int:
        if not self._total:
            raise ConfigError("resources.net.total", f"{self.iface} reports no link speed; give its "
                              "bandwidth in bytes/s")
        return self._total

    def open(self) -> None:
        self.collector.open()
        self.htb = HtbEnforcer(self.journal, self.iface, self.total(), self.collector.class_map(),
                               dry_run=self.dry_run)
        if self.ingress:
            self.ingress_shaper = IngressShaper(self.journal, self.iface, self.total(),
                                                egress=self.htb, dry_run=self.dry_run)
        for task in self.tier_of:
            self._shape(task)

    def measure(self, tasks: Mapping[str, TaskCgroup]) -> dict[str, float]:
        delta = self.collector.drain()
        self.last_dropped = delta.dropped
        idx = self.collector.ifindex[self.iface]
        return {name: delta.bytes_per_s(delta.for_cgroups(cg.cgroup_ids(), idx, EGRESS))
                for name, cg in tasks.items() if name in self.tasks}

    def plan(self, cg: TaskCgroup, units: int) -> list:
        out = [(f"tc:{self.iface} class {cg.name}", str(units))]
        if self.ingress:
            out.append((f"tc:{self.iface} ingress (ifb) class {cg.name}", str(units)))
        return out

    def apply(self, cg: TaskCgroup, units: int) -> list[HtbClass]:
        if cg.name not in self.tasks or self.htb is None:
            return []
        done = self.htb.apply(cg.name, cg.cgroup_ids(), units)
        if self.ingress_shaper is not None:
            done += self.ingress_shaper.apply(cg.name, units)
        return done

    def close(self) -> None:
        try:
            if self.ingress_shaper is not None:
                self.ingress_shaper.restore()
            if self.htb is not None:
                self.htb.restore()
        finally:
            self.collector.close()


def make(ctx: DriverContext) -> NetDriver:
    targets = {t.name: t.targets[NET] for t in ctx.config.tasks if NET in getattr(t, "targets", {})}
    ifaces = set(targets.values())
    if not ifaces:
        raise ConfigError("task.net.interface", "no task names an interface for its net limit")
    if len(ifaces) > 1:
        raise ConfigError("task.net.interface", "every net task must name the same interface "
                          f"(the pool is one link's bandwidth); got {sorted(map(str, ifaces))}")
    return NetDriver(ctx, next(iter(ifaces)), set(targets))
