"""Shaping what an interface receives: redirect its ingress to an ifb and shape there."""
from __future__ import annotations

import errno

from rswap_ebpf.errors import ConfigError, EnforceError, FeatureMissing
from rswap_ebpf.host.journal import Journal, register_undo
from rswap_ebpf.host.net.htb import HtbClass, HtbEnforcer
from rswap_ebpf.host.net.tc import (RSWAP_PRIO, Iface, _kind, _nl_error, _qdiscs, _tc_del_if_present,
                                    ifindex, ipr)


IFB_KIND = "tc-ifb"
MIRRED_KIND = "tc-mirred"
MIRRED_PRIO = RSWAP_PRIO + 1  # after rswap's ingress BPF filter, which sets the class


def ifb_name(idx: int) -> str:
    return f"rswifb{idx}"


class IngressShaper:
    """Shape what ``iface`` receives: its clsact ingress is redirected (u32 match-all + mirred)
    to an ifb device rswap creates in the same namespace, whose root is an :class:`HtbEnforcer`
    with the same class per task as egress.

    What selects a task's class on ingress is the *flow*, not the cgroup: at ingress no socket has
    been looked up yet.  rswap's ingress BPF filter (which runs before the redirect) sets
    ``skb->priority`` from the flow table the egress program fills for each classified socket
    (remote addr:port, local addr:port, protocol).  A flow the task has not yet sent on goes
    through the ifb unshaped.  Needs the collector's clsact (NetCollector(flows=True)).
    """

    def __init__(self, journal: Journal, iface: Iface, total_bytes_per_s: int,
                 egress: HtbEnforcer | None = None, dry_run: bool = False):
        self.journal = journal
        self.iface = iface
        self.dry_run = dry_run
        self.ifb: Iface | None = None
        self.total = total_bytes_per_s
        self.egress = egress
        self.htb: HtbEnforcer | None = None

    def setup(self) -> None:
        if self.htb is not None:
            return
        if self.dry_run:
            self.htb = HtbEnforcer(self.journal, self.iface, self.total, dry_run=True)
            self._share_egress()
            return
        with ipr(self.iface) as ip:
            idx = ifindex(ip, self.iface)
            if not any(_kind(q) == "clsact" for q in _qdiscs(ip, idx)):
                raise EnforceError(f"tc:{self.iface}", "ingress shaping needs rswap's clsact "
                                   "filters on the interface (open the NetCollector first)")
            name = ifb_name(idx)
            if not ip.link_lookup(ifname=name):
                self.journal.record_custom(IFB_KIND, {"name": name, "netns": self.iface.netns})
                try:
                    ip.link("add", ifname=name, kind="ifb")
                except Exception as err:
                    if getattr(err, "code", None) == errno.EOPNOTSUPP:
                        raise FeatureMissing("ifb", f"{self.iface}: {err}",
                                             "the kernel needs CONFIG_IFB (modprobe ifb)") from None
                    raise EnforceError(f"tc:{self.iface}", f"ifb {name}: {err}") from None
            ifb_idx = ip.link_lookup(ifname=name)[0]
            ip.link("set", index=ifb_idx, state="up")
            self.journal.record_custom(MIRRED_KIND, {**self.iface.as_dict(), "parent": "ffff:fff2"})
            try:
                ip.tc("add-filter", "u32", idx, parent=0xFFFFFFF2, prio=MIRRED_PRIO,
                      protocol=0x0003, target=0x1, keys=["0x0/0x0+0"],
                      action={"kind": "mirred", "direction": "egress", "action": "redirect",
                              "ifindex": ifb_idx})
            except Exception as err:
                raise _nl_error(err, self.iface, "mirred redirect to ifb") from None
        self.ifb = Iface(name, self.iface.netns)
        self.htb = HtbEnforcer(self.journal, self.ifb, self.total)
        self._share_egress()

    def _share_egress(self) -> None:
        """One class id per task, both directions, and the same tiers."""
        if self.egress is not None and self.htb is not None:
            self.htb.classes = self.egress.classes
            self.htb.tier_of = self.egress.tier_of
            self.htb.max_ceil = self.egress.max_ceil

    def apply(self, task: str, bytes_per_s: int) -> list[HtbClass]:
        """The task's ingress class: rate = allocation, ceil = allocation + spare."""
        self.setup()
        assert self.htb is not None
        return self.htb.apply(task, set(), bytes_per_s)

    def current(self) -> dict[int, HtbClass]:
        return self.htb.current() if self.htb is not None and self.ifb is not None else {}

    def forget(self, task: str) -> None:
        if self.htb is not None:
            self.htb.forget(task)

    def restore(self) -> None:
        """The ifb's HTB, the redirect, then the ifb itself (this shaper's journal entries)."""
        if self.htb is not None and self.ifb is not None:
            self.htb.restore()
        for entry in reversed(self.journal.entries()):
            if entry.get("op") != "custom" or entry["data"].get("netns") != self.iface.netns:
                continue
            if entry.get("kind") == MIRRED_KIND and entry["data"].get("name") == self.iface.name:
                _undo_mirred(entry["data"])
            elif entry.get("kind") == IFB_KIND and self.ifb is not None and \
                    entry["data"].get("name") == self.ifb.name:
                _undo_ifb(entry["data"])
        self.htb = None
        self.ifb = None


def _undo_mirred(data: dict) -> None:
    # pyroute2 builds u32 options even for a delete: give it the match-all again.
    _tc_del_if_present(data, "del-filter", "u32", parent=0xFFFFFFF2, prio=MIRRED_PRIO,
                       protocol=0x0003, target=0x1, keys=["0x0/0x0+0"])


def _undo_ifb(data: dict) -> None:
    iface = Iface(data["name"], data.get("netns"))
    try:
        with ipr(iface) as ip:
            idx = ip.link_lookup(ifname=iface.name)
            if idx:
                ip.link("del", index=idx[0])
    except ConfigError:
        return


register_undo(MIRRED_KIND, _undo_mirred)
register_undo(IFB_KIND, _undo_ifb)
