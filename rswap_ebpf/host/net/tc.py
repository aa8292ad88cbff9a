"""Traffic control through pyroute2: the clsact BPF hook and the per-task HTB tree.

Layout rswap builds on a task's egress interface::

    clsact  ffff:    ingress + egress cls_bpf (direct-action) filters, prio RSWAP_PRIO
    htb     1:       root, ``default 0``: traffic of no task goes out unshaped (HTB direct)
      class 1:1      rate = ceil = interface total
        class 1:<n>  one per task: rate = allocation, ceil = allocation + spare

The egress BPF program writes the task's class id into ``skb->priority`` (HTB classifies by it),
looking it up by the socket's cgroup in the ``rswap_net_class`` map (a :class:`ClassMap`).

Every change is journalled first as a ``custom`` entry with an undo handler registered here, so
``rswap restore`` in a fresh process removes the filters, the clsact qdisc rswap added, and puts the
interface's original root qdisc back.  The original root qdisc is journalled as the kernel dumped
it: kind, handle and the raw ``TCA_OPTIONS`` payload (and, under ``mq``, each per-queue child the
same way); restore recreates whatever differs with those very bytes, so a non-default setting
(``fq_codel limit 1234``, ``pfifo limit 50``) comes back as it was, whatever the kind.  A root qdisc
with classes or filters of its own (htb, tbf, prio...) cannot be captured that way and is refused
before anything changes.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import logging
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from rswap_ebpf.errors import ConfigError, EnforceError, FeatureMissing
from rswap_ebpf.host.journal import Journal, register_undo

log = logging.getLogger(__name__)

RSWAP_PRIO = 0xC0DE          # filter priority marking rswap's cls_bpf filters
HTB_MAJOR = 0x1
ROOT_CLASS = 0x10001         # 1:1
FIRST_TASK_MINOR = 0x10
MIN_RATE_BYTES = 125         # HTB needs a rate > 0: 1 kbit/s
#: Root qdiscs rswap may replace: their whole configuration is their options (mq: its per-queue
#: children, journalled too), so kind + handle + options recreate them exactly.
RESTORABLE_ROOTS = {"noqueue", "pfifo_fast", "fq_codel", "fq", "sfq", "pfifo", "bfifo", "mq", "cake"}
TC_H_ROOT = 0xFFFFFFFF
_TCA_KIND, _TCA_OPTIONS = 1, 2
_NLMSG_HDR, _TCMSG_LEN = 16, 20
_IFNAME_RE = re.compile(r"^[^/:\s]{1,15}$")
CLSACT_KIND = "tc-clsact"
FILTER_KIND = "tc-bpf-filter"
ROOT_KIND = "tc-root"


@dataclass(frozen=True)
class Iface:
    """An interface, optionally inside a named network namespace (``ip netns``)."""

    name: str
    netns: str | None = None

    def __str__(self) -> str:
        return f"{self.netns}:{self.name}" if self.netns else self.name

    def as_dict(self) -> dict:
        return {"name": self.name, "netns": self.netns}


def pyroute2():
    try:
        import pyroute2 as mod
    except ImportError as err:
        raise FeatureMissing("pyroute2", str(err), "pip install pyroute2 (tools/setup does)") from None
    return mod


@contextlib.contextmanager
def ipr(iface: Iface) -> Iterator:
    mod = pyroute2()
    try:
        # flags=0: open an existing namespace only (pyroute2's default, O_CREAT, would make one).
        ip = mod.IPRoute(netns=iface.netns, flags=0) if iface.netns else mod.IPRoute()
    except Exception as err:
        raise ConfigError("net.interface", f"cannot open network namespace {iface.netns!r}: {err}") from None
    try:
        yield ip
    finally:
        ip.close()


def ifindex(ip, iface: Iface, field_name: str = "net.interface") -> int:
    idx = ip.link_lookup(ifname=iface.name)
    if not idx:
        raise ConfigError(field_name, f"no interface {iface}")
    return idx[0]


def parse_iface(text: object, field_name: str = "net.interface") -> Iface:
    """``eth0`` or ``netns:eth0`` -> :class:`Iface`, checked to exist (ConfigError otherwise)."""
    if not isinstance(text, str) or not text:
        raise ConfigError(field_name, f"{text!r} is not an interface name")
    netns, _, name = text.rpartition(":")
    if not _IFNAME_RE.match(name) or (netns and not _IFNAME_RE.match(netns.replace(".", "x"))):
        raise ConfigError(field_name, f"{text!r} is not an interface name ([netns:]ifname)")
    iface = Iface(name, netns or None)
    import os

    if netns and not os.path.exists(os.path.join("/var/run/netns", netns)):
        raise ConfigError(field_name, f"no network namespace {netns!r} (ip netns list)")
    with ipr(iface) as ip:
        ifindex(ip, iface, field_name)
    return iface


def link_speed_bytes_per_s(iface: Iface) -> int | None:
    """The link's speed from sysfs (host namespace only), or None when it reports none."""
    if iface.netns:
        return None
    try:
        with open(f"/sys/class/net/{iface.name}/speed") as f:
            mbit = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return mbit * 1_000_000 // 8 if mbit > 0 else None


def _nl_error(err: Exception, iface: Iface, what: str) -> Exception:
    code = getattr(err, "code", None)
    if code in (errno.EOPNOTSUPP, errno.ENOENT) and "bpf" in what:
        return FeatureMissing(f"tc {what}", f"{iface}: {err}", "the kernel needs CONFIG_NET_CLS_BPF "
                              "and CONFIG_NET_SCH_INGRESS (clsact)")
    return EnforceError(f"tc:{iface}", f"{what}: {err}")


def _qdiscs(ip, idx: int) -> list:
    return [q for q in ip.get_qdiscs(index=idx)]


def _kind(msg) -> str:
    return msg.get_attr("TCA_KIND")


def raw_options(msg) -> bytes | None:
    """The ``TCA_OPTIONS`` payload of a dumped qdisc, as the kernel sent it (None: none).

    Read from the message bytes rather than pyroute2's decoding: pyroute2 decodes only the kinds
    it has a plugin for (no fq, no mq), and the kernel takes back what it dumps.
    """
    data = bytes(msg.data[msg.offset:msg.offset + msg["header"]["length"]])
    pos = _NLMSG_HDR + _TCMSG_LEN
    while pos + 4 <= len(data):
        length = int.from_bytes(data[pos:pos + 2], sys.byteorder)
        kind = int.from_bytes(data[pos + 2:pos + 4], sys.byteorder) & 0x3FFF
        if length < 4:
            break
        if kind == _TCA_OPTIONS:
            return data[pos + 4:pos + length]
        pos += (length + 3) & ~3
    return None


@dataclass(frozen=True)
class QdiscState:
    """One qdisc as journalled: enough to create it again exactly."""

    kind: str
    handle: int
    parent: int = TC_H_ROOT
    options: bytes | None = None

    @classmethod
    def of(cls, msg) -> QdiscState:
        return cls(_kind(msg), msg["handle"], msg["parent"], raw_options(msg))

    def as_dict(self) -> dict:
        return {"kind": self.kind, "handle": self.handle, "parent": self.parent,
                "options": self.options.hex() if self.options is not None else None}

    @classmethod
    def from_dict(cls, d: dict) -> QdiscState:
        opts = d.get("options")
        return cls(d["kind"], d.get("handle") or 0, d.get("parent", TC_H_ROOT),
                   bytes.fromhex(opts) if opts is not None else None)

    def same_as(self, other: QdiscState | None, exact_options: bool = True) -> bool:
        """Same kind, options and handle (a handle of 0 is the kernel's choice: any will do)."""
        if other is None:
            return self.kind == "noqueue" and self.handle == 0
        return (self.kind == other.kind and (not self.handle or self.handle == other.handle)
                and (not exact_options or self.options == other.options))


@functools.lru_cache(maxsize=1)
def _raw_tcmsg():
    from pyroute2.netlink import nla
    from pyroute2.netlink.rtnl.tcmsg import tcmsg

    class RawTcmsg(tcmsg):
        """tcmsg whose TCA_OPTIONS are bytes passed through untouched."""

        nla_map = (("TCA_UNSPEC", "none"), ("TCA_KIND", "asciiz"), ("TCA_OPTIONS", "raw_options"))
        # pyroute2 compiles nla_map once per class into class attributes, which a subclass
        # inherits: once tcmsg has decoded a dump, this class would encode with tcmsg's table
        # (the pfifo plugin turned our bytes into "limit 0").  Make it compile its own.
        _nlmsg_base__compiled_nla = False
        _nlmsg_base__t_nla_map = None
        _nlmsg_base__r_nla_map = None

        class raw_options(nla):
            fields = [("value", "s")]

            def encode(self):
                self["value"] = self.value
                nla.encode(self)

    return RawTcmsg


def create_qdisc(ip, idx: int, q: QdiscState) -> None:
    """Create (or replace) ``q`` at its parent with its journalled options, byte for byte."""
    from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST
    from pyroute2.netlink.rtnl import RTM_NEWQDISC

    msg = _raw_tcmsg()()
    msg["family"] = 0
    msg["index"] = idx
    msg["handle"] = q.handle
    msg["parent"] = q.parent
    msg["attrs"] = [["TCA_KIND", q.kind]] + ([["TCA_OPTIONS", q.options]] if q.options else [])
    msg["header"]["type"] = RTM_NEWQDISC
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
    # nlm_request_batch: pyroute2 0.9.7's synchronous nlm_request fails on its own status dict.
    ip.nlm_request_batch([msg])


def root_state(ip, idx: int) -> tuple[QdiscState | None, list[QdiscState]]:
    """The root qdisc and, when it is ``mq``, the per-queue qdiscs under it."""
    qs = _qdiscs(ip, idx)
    root = next((q for q in qs if q["parent"] == TC_H_ROOT), None)
    if root is None:
        return None, []
    state = QdiscState.of(root)
    children = []
    if state.kind == "mq" and state.handle:
        children = [QdiscState.of(q) for q in qs
                    if q["parent"] != TC_H_ROOT and q["parent"] >> 16 == state.handle >> 16]
    return state, sorted(children, key=lambda c: c.parent)


# -- clsact + cls_bpf --------------------------------------------------------------------------
def attach_bpf(journal: Journal | None, iface: Iface, ingress_fd: int | None, egress_fd: int | None,
               name: str = "rswap") -> None:
    """Add clsact (when absent) and rswap's direct-action filters on ingress and egress."""
    with ipr(iface) as ip:
        idx = ifindex(ip, iface)
        has_clsact = any(_kind(q) == "clsact" for q in _qdiscs(ip, idx))
        if not has_clsact:
            if journal is not None:
                journal.record_custom(CLSACT_KIND, iface.as_dict())
            try:
                ip.tc("add", "clsact", idx)
            except Exception as err:
                raise _nl_error(err, iface, "clsact qdisc") from None
        for parent, fd in (("ffff:fff2", ingress_fd), ("ffff:fff3", egress_fd)):
            if fd is None:
                continue
            data = {**iface.as_dict(), "parent": parent}
            if journal is not None:
                journal.record_custom(FILTER_KIND, data)
            try:
                ip.tc("add-filter", "bpf", idx, ":1", fd=fd, name=f"{name}_{parent[-1]}",
                      parent=parent, prio=RSWAP_PRIO, direct_action=True, classid=1)
            except Exception as err:
                raise _nl_error(err, iface, "cls_bpf filter") from None


def detach_bpf(iface: Iface, remove_clsact: bool) -> None:
    for parent in ("ffff:fff2", "ffff:fff3"):
        _undo_filter({**iface.as_dict(), "parent": parent})
    if remove_clsact:
        _undo_clsact(iface.as_dict())


def _tc_del_if_present(data: dict, *args, **kwargs) -> None:
    """``ip.tc(*args)`` on the journalled interface, at its current index; an interface,
    namespace or tc object that is already gone means there is nothing left to undo."""
    iface = Iface(data["name"], data.get("netns"))
    try:
        with ipr(iface) as ip:
            idx = ip.link_lookup(ifname=iface.name)
            if not idx:
                return
            try:
                ip.tc(args[0], args[1], idx[0], *args[2:], **kwargs)
            except Exception as err:
                if getattr(err, "code", None) not in (errno.ENOENT, errno.EINVAL):
                    raise
    except ConfigError:
        return  # the namespace is gone, and everything in it


def _undo_filter(data: dict) -> None:
    _tc_del_if_present(data, "del-filter", "bpf", ":1", parent=data["parent"], prio=RSWAP_PRIO)


def _undo_clsact(data: dict) -> None:
    _tc_del_if_present(data, "del", "clsact")


register_undo(FILTER_KIND, _undo_filter)
register_undo(CLSACT_KIND, _undo_clsact)


# -- HTB ------------------------------------------------------------------------------------------
class ClassMap(Protocol):
    """cgroup2 id -> HTB class id, read by the egress BPF program (``rswap_net_class``)."""

    def set(self, cgroup_id: int, classid: int) -> None: ...

    def remove(self, cgroup_id: int) -> None: ...


@dataclass(frozen=True)
class HtbClass:
    classid: int
    rate_bytes_per_s: int
    ceil_bytes_per_s: int


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
        """Set ``task``'s rate, refresh every class's ceil to rate + spare, map its cgroups."""
        self.setup()
        self.rates[task] = max(MIN_RATE_BYTES, int(bytes_per_s))
        cid = self.classid(task)
        spare = self.spare()
        done = []
        for name, rate in self.rates.items():
            cls = HtbClass(self.classid(name), rate, min(self.total, rate + spare))
            if self.dry_run:
                self.planned.append((name, cls))
                continue
            with ipr(self.iface) as ip:
                idx = ifindex(ip, self.iface)
                try:
                    ip.tc("replace-class", "htb", idx, cls.classid, parent=ROOT_CLASS,
                          rate=cls.rate_bytes_per_s, ceil=cls.ceil_bytes_per_s)
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
                                            ceil64 or parms["ceil"])
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


# -- ingress through an ifb -------------------------------------------------------------------
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
        if self.egress is not None:
            self.htb.classes = self.egress.classes  # one class id per task, both directions

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
