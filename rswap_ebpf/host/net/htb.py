"""The per-task HTB tree on a task's egress interface (and on ingress's ifb).

Layout rswap builds::

    htb     1:       root, ``default 0``: traffic of no task goes out unshaped (HTB direct)
      class 1:1      rate = ceil = interface total
        class 1:<n>  one per task: rate = allocation; ceil and prio by tier (below)

By tier (:meth:`HtbEnforcer.set_tier`), work-conserving for the critical tier: a critical
task's class has ceil = the interface total and HTB prio 0, so it may borrow the whole link
whenever it needs more than its forecast, and HTB serves it first among the classes that send
within their rate and again among those that borrow.  Any other task's class has ceil =
allocation + spare (what no task's rate holds) and prio 1 (normal) or 2 (batch).  A critical class
capped at rate + spare would hold back exactly the packets of a burst its forecast did not see,
while a bulk class beside it held the rest of the link.

The egress BPF program writes the task's class id into ``skb->priority`` (HTB classifies by it),
looking it up by the socket's cgroup in the ``rswap_net_class`` map (a :class:`ClassMap`).

The interface's original root qdisc is journalled as the kernel dumped it (and, under ``mq``,
each per-queue child the same way); restore recreates whatever differs with those very bytes, so
a non-default setting (``fq_codel limit 1234``, ``pfifo limit 50``) comes back as it was,
whatever the kind.  A root qdisc with classes or filters of its own (htb, tbf, prio...) cannot be
captured that way and is refused before anything changes.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Protocol

from rswap_ebpf.errors import ConfigError, EnforceError
from rswap_ebpf.host.journal import Journal, register_undo
from rswap_ebpf.host.net.tc import (TC_H_ROOT, Iface, QdiscState, _kind, _nl_error, create_qdisc,
                                    ifindex, ipr, root_state)

HTB_MAJOR = 0x1
ROOT_CLASS = 0x10001         # 1:1
FIRST_TASK_MINOR = 0x10
MIN_RATE_BYTES = 125         # HTB needs a rate > 0: 1 kbit/s
#: Root qdiscs rswap may replace: their whole configuration is their options (mq: its per-queue
#: children, journalled too), so kind + handle + options recreate them exactly.
RESTORABLE_ROOTS = {"noqueue", "pfifo_fast", "fq_codel", "fq", "sfq", "pfifo", "bfifo", "mq", "cake"}
ROOT_KIND = "tc-root"


class ClassMap(Protocol):
    """cgroup2 id -> HTB class id, read by the egress BPF program (``rswap_net_class``)."""

    def set(self, cgroup_id: int, classid: int) -> None: ...

    def remove(self, cgroup_id: int) -> None: ...


#: HTB prio per tier (0 is served first); a task of no known tier counts as normal.
TIER_PRIO = {"critical": 0, "normal": 1, "batch": 2}


@dataclass(frozen=True)
class HtbClass:
    classid: int
    rate_bytes_per_s: int
    ceil_bytes_per_s: int
    prio: int = TIER_PRIO["normal"]


class HtbEnforcer:
    """One HTB class per task on one interface: apply()/current()/restore()."""

    def __init__(self, journal: Journal, iface: Iface, total_bytes_per_s: int,
                 class_map: ClassMap | None = None, dry_run: bool = False):
        self.journal = journal
        self.iface = iface
        self.total = max(MIN_RATE_BYTES, int(total_bytes_per_s))
        self.class_map = class_map
        self.dry_run = dry_run
        self.classes: dict[str, int] = {}
        self.rates: dict[str, int] = {}
        self._cgroups: dict[str, set[int]] = {}
        self._ready = False
        self.planned: list[tuple[str, HtbClass]] = []
        self.tier_of: dict[str, str] = {}
        self.max_ceil: dict[str, int] = {}

    def set_tier(self, task: str, tier: str, max_bytes_per_s: int | None = None) -> None:
        """``task``'s tier shapes its class from the next apply; ``max_bytes_per_s`` (the
        operator's max) bounds a critical class's ceil."""
        self.tier_of[task] = str(tier).lower()
        if max_bytes_per_s is None:
            self.max_ceil.pop(task, None)
        else:
            self.max_ceil[task] = max(MIN_RATE_BYTES, int(max_bytes_per_s))

    def shape(self, task: str, rate: int, spare: int) -> HtbClass:
        """The class for ``task`` at ``rate``: critical ceil = the link (or its max), others
        ceil = rate + spare."""
        tier = self.tier_of.get(task, "normal")
        if tier == "critical":
            ceil = min(self.total, self.max_ceil.get(task, self.total))
        else:
            ceil = min(self.total, rate + spare)
        return HtbClass(self.classid(task), rate, max(rate, ceil),
                        TIER_PRIO.get(tier, TIER_PRIO["normal"]))

    def setup(self) -> None:
        """Journal the original root qdisc, then put rswap's HTB root and its 1:1 class there."""
        if self._ready or self.dry_run:
            self._ready = True
            return
        with ipr(self.iface) as ip:
            idx = ifindex(ip, self.iface)
            root, children = root_state(ip, idx)
            kind = root.kind if root is not None else "noqueue"
            handle = root.handle if root is not None else 0
            if kind == "htb" and handle == HTB_MAJOR << 16 and self._journalled_root():
                pass  # ours, from this run's journal (a restart after restore failed)
            elif kind not in RESTORABLE_ROOTS:
                raise EnforceError(f"tc:{self.iface}", f"root qdisc {kind} {handle >> 16:x}: has a "
                                   "configuration rswap cannot restore; remove it or choose another "
                                   "interface")
            self.journal.record_custom(ROOT_KIND, {
                **self.iface.as_dict(), "kind": kind, "handle": handle,
                "options": root.as_dict()["options"] if root is not None else None,
                "children": [c.as_dict() for c in children]})
            try:
                ip.tc("replace", "htb", idx, HTB_MAJOR << 16, default=0)
                ip.tc("replace-class", "htb", idx, ROOT_CLASS, parent=HTB_MAJOR << 16,
                      rate=self.total, ceil=self.total)
            except Exception as err:
                raise _nl_error(err, self.iface, "htb qdisc") from None
        self._ready = True

    def _journalled_root(self) -> bool:
        return any(e.get("kind") == ROOT_KIND and e["data"].get("name") == self.iface.name
                   for e in self.journal.entries() if e.get("op") == "custom")

    def classid(self, task: str) -> int:
        if task not in self.classes:
            self.classes[task] = (HTB_MAJOR << 16) | (FIRST_TASK_MINOR + len(self.classes))
        return self.classes[task]

    def spare(self) -> int:
        return max(0, self.total - sum(self.rates.values()))

    def apply(self, task: str, cgroup_ids: set[int], bytes_per_s: int) -> list[HtbClass]:
        """Set ``task``'s rate, refresh every class's ceil (:meth:`shape`), map its cgroups."""
        self.setup()
        self.rates[task] = max(MIN_RATE_BYTES, int(bytes_per_s))
        cid = self.classid(task)
        spare = self.spare()
        done = []
        for name, rate in self.rates.items():
            cls = self.shape(name, rate, spare)
            if self.dry_run:
                self.planned.append((name, cls))
                continue
            with ipr(self.iface) as ip:
                idx = ifindex(ip, self.iface)
                try:
                    ip.tc("replace-class", "htb", idx, cls.classid, parent=ROOT_CLASS,
                          rate=cls.rate_bytes_per_s, ceil=cls.ceil_bytes_per_s, prio=cls.prio)
                except Exception as err:
                    raise _nl_error(err, self.iface, "htb class") from None
            done.append(cls)
        if self.class_map is not None and not self.dry_run:
            old = self._cgroups.get(task, set())
            for cg in old - cgroup_ids:
                self.class_map.remove(cg)
            for cg in cgroup_ids:
                self.class_map.set(cg, cid)
            self._cgroups[task] = set(cgroup_ids)
        return done

    def current(self) -> dict[int, HtbClass]:
        """Class id -> rate and ceil as the kernel has them now."""
        out = {}
        with ipr(self.iface) as ip:
            idx = ifindex(ip, self.iface)
            for c in ip.get_classes(index=idx):
                if _kind(c) != "htb":
                    continue
                parms = c.get_attr("TCA_OPTIONS").get_attr("TCA_HTB_PARMS")
                rate64 = c.get_attr("TCA_OPTIONS").get_attr("TCA_HTB_RATE64")
                ceil64 = c.get_attr("TCA_OPTIONS").get_attr("TCA_HTB_CEIL64")
                out[c["handle"]] = HtbClass(c["handle"], rate64 or parms["rate"],
                                            ceil64 or parms["ceil"], parms["prio"])
        return out

    def forget(self, task: str) -> None:
        """A task left: its class stays until restore, its cgroups are unmapped."""
        for cg in self._cgroups.pop(task, set()):
            if self.class_map is not None:
                self.class_map.remove(cg)
        self.rates.pop(task, None)

    def restore(self) -> None:
        """Put the original root qdisc back (this enforcer's journal entries, newest first)."""
        for cgs in self._cgroups.values():
            for cg in cgs:
                if self.class_map is not None:
                    self.class_map.remove(cg)
        self._cgroups.clear()
        for entry in reversed(self.journal.entries()):
            if entry.get("op") == "custom" and entry.get("kind") == ROOT_KIND and \
                    entry["data"].get("name") == self.iface.name and \
                    entry["data"].get("netns") == self.iface.netns:
                _undo_root(entry["data"])
        self._ready = False
        self.rates.clear()
        self.classes.clear()


def _undo_root(data: dict) -> None:
    """Take rswap's HTB root away and recreate the journalled root (and mq children) if the
    kernel's default is not it.  Entries from before options were journalled compare by kind."""
    iface = Iface(data["name"], data.get("netns"))
    exact = "options" in data
    want = QdiscState(data["kind"], data.get("handle") or 0, TC_H_ROOT,
                      bytes.fromhex(data["options"]) if data.get("options") is not None else None)
    try:
        with ipr(iface) as ip:
            idx = ip.link_lookup(ifname=iface.name)
            if not idx:
                return
            idx = idx[0]
            root, _ = root_state(ip, idx)
            if root is not None and root.kind == "htb":
                try:
                    ip.tc("del", "htb", idx, root.handle)
                except Exception as err:
                    if getattr(err, "code", None) not in (errno.ENOENT, errno.EINVAL):
                        raise
            # Deleting the root reinstates the kernel's default; recreate the original if differs.
            root, _ = root_state(ip, idx)
            if not want.same_as(root, exact):
                try:
                    create_qdisc(ip, idx, want)
                except Exception as err:
                    # Same handle, other kind: the kernel will not replace across kinds.
                    if getattr(err, "code", None) != errno.EINVAL or root is None or not root.handle:
                        raise
                    ip.tc("del", root.kind, idx, root.handle)
                    create_qdisc(ip, idx, want)
            _, now = root_state(ip, idx)
            have = {c.parent: c for c in now}
            for child in map(QdiscState.from_dict, data.get("children", [])):
                if not child.same_as(have.get(child.parent)):
                    create_qdisc(ip, idx, child)
    except ConfigError:
        return


register_undo(ROOT_KIND, _undo_root)
