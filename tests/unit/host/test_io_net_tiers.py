"""IO and network shaped by tier: a critical task is never held below what the device or the
link can give it; other tasks get their allocation.

The IO half plans v1 blkio throttle lines (cgroup-v1/blkio-controller.rst: "MAJ:MIN N", N = 0
removes the rule) on a fake tree; the network half checks the HTB classes the enforcer would
write (tc-htb(8): a class may borrow up to its ceil; lower prio is served first), in dry-run.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

from rswap_ebpf.host.cgroup import CgroupMounts, TaskCgroup
from rswap_ebpf.host.driver import DriverContext, ShapesByTier
from rswap_ebpf.host.io.driver import IoDriver
from rswap_ebpf.host.io.enforcer import BlockDevice, IoLimit
from rswap_ebpf.host.journal import Journal
from rswap_ebpf.host.net.htb import TIER_PRIO, HtbClass, HtbEnforcer
from rswap_ebpf.host.net.tc import Iface

DEV = BlockDevice(7, 3, "/dev/loop3")
MBIT = 125_000


class _NoCollector:
    def open(self): ...

    def close(self): ...


def _io_driver(tmp_path) -> IoDriver:
    ctx = DriverContext(CgroupMounts("legacy", None, {"blkio": str(tmp_path)}),
                        Journal(str(tmp_path / "j.jsonl")), None,
                        SimpleNamespace(totals={}, options={}), dry_run=True)
    return IoDriver(ctx, DEV, {"svc", "batch"}, collector=_NoCollector())


def _cg(tmp_path, name) -> TaskCgroup:
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    return TaskCgroup(name, f"rswap/{name}", {"blkio": str(d)}, True)


def _iops_lines(writes) -> dict[str, str]:
    return {os.path.basename(p): v for p, v in writes if "iops" in p}


def test_io_driver_shapes_by_tier():
    assert issubclass(IoDriver, ShapesByTier)


def test_a_critical_task_is_never_throttled_at_its_allocation(tmp_path):
    drv = _io_driver(tmp_path)
    drv.set_priority("svc", "critical")
    drv.set_priority("batch", "batch")
    svc, batch = _cg(tmp_path, "svc"), _cg(tmp_path, "batch")
    assert drv.limit_for("svc", 240) == IoLimit()
    assert _iops_lines(drv.plan(svc, 240)) == {"blkio.throttle.read_iops_device": "7:3 0",
                                               "blkio.throttle.write_iops_device": "7:3 0"}
    assert _iops_lines(drv.plan(batch, 900)) == {"blkio.throttle.read_iops_device": "7:3 900",
                                                 "blkio.throttle.write_iops_device": "7:3 900"}


def test_the_operators_max_is_the_one_limit_a_critical_task_gets(tmp_path):
    drv = _io_driver(tmp_path)
    drv.set_priority("svc", "critical")
    drv.set_limit("svc", 1500)
    assert drv.limit_for("svc", 240) == IoLimit.iops(1500)
    drv.set_limit("svc", None)
    assert drv.limit_for("svc", 240) == IoLimit()


def test_a_task_of_no_known_tier_keeps_its_allocation(tmp_path):
    assert _io_driver(tmp_path).limit_for("other", 300) == IoLimit.iops(300)


def _htb(total=100 * MBIT) -> HtbEnforcer:
    return HtbEnforcer(journal=None, iface=Iface("veth0", "ns"), total_bytes_per_s=total,
                       dry_run=True)


def _planned(htb: HtbEnforcer) -> dict[str, HtbClass]:
    return {name: cls for name, cls in htb.planned}


def test_a_critical_class_may_borrow_the_whole_link_and_is_served_first():
    htb = _htb()
    htb.set_tier("svc", "critical")
    htb.set_tier("bulk", "batch")
    htb.apply("svc", set(), 1 * MBIT)
    htb.planned.clear()
    htb.apply("bulk", set(), 99 * MBIT)  # the bulk flow's forecast holds the rest: no spare
    got = _planned(htb)
    assert got["svc"] == HtbClass(htb.classid("svc"), 1 * MBIT, 100 * MBIT, TIER_PRIO["critical"])
    assert got["bulk"] == HtbClass(htb.classid("bulk"), 99 * MBIT, 99 * MBIT, TIER_PRIO["batch"])
    assert TIER_PRIO["critical"] < TIER_PRIO["normal"] < TIER_PRIO["batch"]


def test_other_tiers_borrow_only_the_spare():
    htb = _htb()
    htb.set_tier("a", "normal")
    htb.apply("a", set(), 30 * MBIT)
    htb.apply("b", set(), 20 * MBIT)  # no tier said: normal
    got = _planned(htb)
    assert got["a"].ceil_bytes_per_s == 80 * MBIT and got["a"].prio == TIER_PRIO["normal"]
    assert got["b"].ceil_bytes_per_s == 70 * MBIT and got["b"].prio == TIER_PRIO["normal"]


def test_the_operators_max_bounds_a_critical_class():
    htb = _htb()
    htb.set_tier("svc", "critical", max_bytes_per_s=40 * MBIT)
    htb.apply("svc", set(), 1 * MBIT)
    assert _planned(htb)["svc"].ceil_bytes_per_s == 40 * MBIT
