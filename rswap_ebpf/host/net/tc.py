"""Traffic control through pyroute2: interfaces, qdisc capture, and the clsact BPF hook.

rswap's collector attaches its cls_bpf (direct-action) filters on a ``clsact`` qdisc, prio
RSWAP_PRIO, on ingress and egress; the per-task shaping built on top lives in
:mod:`rswap_ebpf.host.net.htb` (egress HTB tree) and :mod:`rswap_ebpf.host.net.ingress` (ifb).

Every change is journalled first as a ``custom`` entry with an undo handler registered where it
is made, so ``rswap restore`` in a fresh process removes the filters and the clsact qdisc rswap
added.  A qdisc is captured as the kernel dumps it (:class:`QdiscState`: kind, handle and the raw
``TCA_OPTIONS`` payload), so it can be recreated with those very bytes.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from rswap_ebpf.errors import ConfigError, EnforceError, FeatureMissing
from rswap_ebpf.host.journal import Journal, register_undo

RSWAP_PRIO = 0xC0DE          # filter priority marking rswap's cls_bpf filters
TC_H_ROOT = 0xFFFFFFFF
_TCA_KIND, _TCA_OPTIONS = 1, 2
_NLMSG_HDR, _TCMSG_LEN = 16, 20
_IFNAME_RE = re.compile(r"^[^/:\s]{1,15}$")
CLSACT_KIND = "tc-clsact"
FILTER_KIND = "tc-bpf-filter"


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
