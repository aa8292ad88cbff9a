"""io.max / blkio writers and the per-line journal, on a fake cgroup tree.

The fake follows the kernel's documented formats (Documentation/admin-guide/cgroup-v2.rst "io.max":
one "MAJ:MIN rbps=.. wbps=.. riops=.. wiops=.." line per limited device, writing a line replaces
that device's values; cgroup-v1/blkio-controller.rst: "MAJ:MIN N" lines, N = 0 removes the rule).
A plain file cannot merge lines like the kernel does, so the fake file holds one device's line.
"""
from __future__ import annotations

import os

import pytest

from rswap_ebpf.host.io.enforcer import (BlockDevice, CgroupV1IoWriter, CgroupV2IoWriter, IoEnforcer,
                                      IoLimit, resolve_device)
from rswap_ebpf.host.cgroup import TaskCgroup
from rswap_ebpf.host.journal import Journal
from rswap_ebpf.errors import ConfigError

DEV = BlockDevice(7, 3, "/dev/loop3")


@pytest.fixture
def v2_tree(tmp_path, monkeypatch):
    monkeypatch.setenv("RSWAP_CGROUP_ROOT", str(tmp_path))  # restore acts only below the mounts
    d = tmp_path / "unified" / "rswap" / "t"
    d.mkdir(parents=True)
    (d / "io.max").write_text("")
    return TaskCgroup("t", "rswap/t", {"unified": str(d)}, True), tmp_path


def test_v2_plan_and_current(v2_tree):
    cg, _ = v2_tree
    w = CgroupV2IoWriter()
    assert w.plan(cg, DEV, IoLimit.iops(250)) == [
        (os.path.join(cg.dirs["unified"], "io.max"), "7:3 rbps=max wbps=max riops=250 wiops=250")]
    assert w.current(cg, DEV) == IoLimit()
    assert IoLimit.iops(0) == IoLimit(riops=1, wiops=1)  # 0 would mean "unlimited" to the kernel


def test_enforcer_journals_device_line_and_restores_it(v2_tree):
    cg, tmp = v2_tree
    path = os.path.join(cg.dirs["unified"], "io.max")
    with open(path, "w") as f:
        f.write("7:3 rbps=1000 wbps=max riops=max wiops=max\n")
    journal = Journal(str(tmp / "journal.jsonl"))
    enf = IoEnforcer(journal, CgroupV2IoWriter())
    assert enf.apply(cg, DEV, IoLimit.iops(100))
    assert enf.apply(cg, DEV, IoLimit.iops(100)) == []  # unchanged: nothing written
    enf.apply(cg, DEV, IoLimit.iops(300))
    entries = [e for e in journal.entries() if e["op"] == "custom"]
    assert len(entries) == 1  # the original, once
    assert entries[0]["data"]["original"] == "7:3 rbps=1000 wbps=max riops=max wiops=max"
    report = journal.restore()
    assert not report.failed
    assert CgroupV2IoWriter().current(cg, DEV) == IoLimit(rbps=1000)


def test_enforcer_backs_off_after_hand_edit(v2_tree):
    cg, tmp = v2_tree
    path = os.path.join(cg.dirs["unified"], "io.max")
    enf = IoEnforcer(Journal(str(tmp / "j.jsonl")), CgroupV2IoWriter())
    enf.apply(cg, DEV, IoLimit.iops(100))
    with open(path, "w") as f:
        f.write("7:3 rbps=max wbps=max riops=5 wiops=5\n")
    assert enf.apply(cg, DEV, IoLimit.iops(400)) == []
    assert CgroupV2IoWriter().current(cg, DEV).riops == 5


def test_v1_plan_covers_iops_and_bps(tmp_path):
    cg = TaskCgroup("t", "rswap/t", {"blkio": str(tmp_path)}, True)
    writes = dict(CgroupV1IoWriter().plan(cg, DEV, IoLimit(riops=10, wiops=20, wbps=4096)))
    assert writes[str(tmp_path / "blkio.throttle.read_iops_device")] == "7:3 10"
    assert writes[str(tmp_path / "blkio.throttle.write_iops_device")] == "7:3 20"
    assert writes[str(tmp_path / "blkio.throttle.read_bps_device")] == "7:3 0"
    assert writes[str(tmp_path / "blkio.throttle.write_bps_device")] == "7:3 4096"


def test_serviced_reads_the_kernels_per_cgroup_counts(tmp_path, v2_tree):
    """v1 ``blkio.throttle.io_serviced`` ("MAJ:MIN Read|Write|Sync|Async|Discard|Total N" lines,
    then "Total N"); v2 ``io.stat`` ("MAJ:MIN rbytes=.. wbytes=.. rios=.. wios=.. dbytes=..
    dios=..", cgroup-v2.rst): reads + writes on the device, None when the file is unreadable."""
    v1 = TaskCgroup("t", "rswap/t", {"blkio": str(tmp_path)}, True)
    assert CgroupV1IoWriter().serviced(v1, DEV) is None
    (tmp_path / "blkio.throttle.io_serviced").write_text(
        "7:3 Read 5\n7:3 Write 100\n7:3 Sync 100\n7:3 Async 5\n7:3 Discard 2\n7:3 Total 107\n"
        "8:0 Read 9\n8:0 Write 9\nTotal 125\n")
    assert CgroupV1IoWriter().serviced(v1, DEV) == 105
    cg, _ = v2_tree
    w = CgroupV2IoWriter()
    assert w.serviced(cg, DEV) is None  # no io.stat
    with open(os.path.join(cg.dirs["unified"], "io.stat"), "w") as f:
        f.write("8:0 rbytes=4096 wbytes=0 rios=1 wios=0 dbytes=0 dios=0\n")
    assert w.serviced(cg, DEV) == 0  # no line yet for this device: nothing issued
    with open(os.path.join(cg.dirs["unified"], "io.stat"), "a") as f:
        f.write("7:3 rbytes=8192 wbytes=409600 rios=2 wios=100 dbytes=0 dios=3\n")
    assert w.serviced(cg, DEV) == 102


@pytest.mark.parametrize("name,msg", [("", "not a block device name"), ("7:x", "not MAJ:MIN"),
                                      ("/etc/passwd", "not a block device"),
                                      ("nosuchdisk0", "No such file")])
def test_bad_device_names(name, msg):
    with pytest.raises(ConfigError, match=msg):
        resolve_device(name, "task a.io.device")


def test_config_names_the_field_and_applies_nothing():
    from rswap_ebpf.runtime import config

    with pytest.raises(ConfigError) as err:
        config.parse('[[task]]\nname = "a"\ncgroup = "x"\nio = { min = 1 }\n')
    assert err.value.field == "task a.io.device"
    with pytest.raises(ConfigError) as err:
        config.parse('[[task]]\nname = "a"\ncgroup = "x"\nnet = { interface = "bad/name" }\n')
    assert err.value.field == "task a.net.interface"


def test_net_ingress_option_is_a_boolean():
    from rswap_ebpf.runtime import config as configmod
    from rswap_ebpf.model.resources import ResourceType

    cfg = configmod.parse("[resources.net]\ntotal = 1000000\ningress = true\n")
    assert cfg.options[ResourceType.NETWORK_BANDWIDTH] == {"ingress": True}
    with pytest.raises(ConfigError, match="resources.net.ingress"):
        configmod.parse("[resources.net]\ntotal = 1000000\ningress = \"yes\"\n")
