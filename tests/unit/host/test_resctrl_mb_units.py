"""Memory-bandwidth units per vendor and mount mode, against the fake resctrl mount.

Follows Documentation/arch/x86/resctrl.rst ("Memory bandwidth Allocation and monitoring") and the
kernel's set-up (``__rdt_get_mem_config_amd()``, ``bw_validate()``): Intel MB values are percent;
AMD's are multiples of 1/8 GB/s up to max_bw (``min_bandwidth`` 0, ``bandwidth_gran`` 1,
``delay_linear`` 0); with ``-o mba_MBps`` they are MiB/s.  rswap allocates percent everywhere and
must write what the host means by it.
"""
from __future__ import annotations

import os

import pytest

from rswap_ebpf.runtime import config as configmod
from rswap_ebpf.host.registry import DriverContext
from rswap_ebpf.host.cache import membw as membwmod
from rswap_ebpf.host.cache import resctrl
from rswap_ebpf.host.cgroup import CgroupMounts, FileApplier, TaskCgroup
from rswap_ebpf.host.journal import Journal
from rswap_ebpf.errors import ConfigError
from tests.fakes.resctrl import FakeResctrl

TASKS = {"web": "critical", "batch": "batch"}


def _read(fake, group):
    with open(os.path.join(fake.root, group, "schemata") if group else
              os.path.join(fake.root, "schemata")) as f:
        return f.read()


@pytest.fixture
def journal(tmp_path):
    j = Journal(str(tmp_path / "state" / "journal.jsonl"))
    yield j
    j.close()


def test_amd_is_detected_and_percent_becomes_eighths_of_a_gbps(tmp_path, journal):
    fake = FakeResctrl(str(tmp_path / "r"), vendor="amd", amd_max_bw=2048, pids=(1, 7))
    try:
        assert "MB:0=2048;1=2048" in _read(fake, "")
        info = resctrl.read_info(fake.root)
        assert info.mb_unit == resctrl.MB_AMD_EIGHTH_GBPS and info.mb_max == 2048
        assert (info.min_bw, info.bw_gran) == (0, 1)
        # Without a peak: percent of the hardware maximum (2048 = 256 GB/s).
        assert info.mb_value(50) == 1024 and info.mb_value(100) == 2048
        assert info.mb_value(0) == 1  # never 0 (no bandwidth at all), though the kernel takes it
        # With the domain's measured peak, 100 GB/s: 45 % = 45 GB/s = 360 eighths.
        assert info.mb_value(45, 100e9) == 360 and info.mb_value(10, 100e9) == 80
        e = resctrl.ResctrlEnforcer(journal, root=fake.root)
        e.mb_peak_bytes_per_s = 100e9
        e.open(TASKS, mount=False)
        before = _read(fake, "")
        e.apply(percent={"web": 45, "batch": 10})
        assert "MB:0=360;1=360" in _read(fake, "rswap-web")
        assert "MB:0= 80;1= 80" in _read(fake, "rswap-batch")
        # Percent as-is would have been accepted and meant 5.6 GB/s: the fake holds the rate.
        assert fake.groups["rswap-web"]["MB"] == {0: 360, 1: 360}
        e.restore()
        assert _read(fake, "") == before and not fake.groups.keys() - {""}
    finally:
        fake.close()


def test_fake_amd_rejects_above_max_bw_like_the_kernel(tmp_path):
    fake = FakeResctrl(str(tmp_path / "r"), vendor="amd", amd_max_bw=2048)
    try:
        fake.mkdir(os.path.join(fake.root, "g"))
        with pytest.raises(OSError):
            fake.write(os.path.join(fake.root, "g", "schemata"), "MB:0=4096\n")
        assert "out of range [0,2048]" in open(os.path.join(fake.root, "info",
                                                            "last_cmd_status")).read()
    finally:
        fake.close()


def _ctx(tmp_path, peak: str):
    cfg = configmod.parse(f"""
[resources.membw]
total = 100
{peak}
[[task]]
name = "web"
priority = "critical"
pids = [1]
""")
    j = Journal(str(tmp_path / "state" / "journal.jsonl"))
    return DriverContext(CgroupMounts("unified", None), j, FileApplier(j), cfg)


def test_mba_mbps_needs_a_peak_and_writes_mib_per_s(tmp_path, monkeypatch):
    fake = FakeResctrl(str(tmp_path / "r"), mba_mbps=True, pids=(1, 500))
    monkeypatch.setenv("RSWAP_RESCTRL_ROOT", fake.root)
    try:
        info = resctrl.read_info(fake.root)
        assert info.mb_unit == resctrl.MB_MIBPS and info.mb_max == 2**32 - 1
        with pytest.raises(ConfigError) as exc:
            membwmod.make(_ctx(tmp_path / "a", ""))
        assert exc.value.args and "peak_bytes_per_s" in str(exc.value)
        assert "mba_MBps" in str(exc.value)
        ctx = _ctx(tmp_path / "b", "peak_bytes_per_s = 20e9")
        drv = membwmod.make(ctx)
        d = tmp_path / "cg" / "web"
        d.mkdir(parents=True)
        (d / "cgroup.procs").write_text("500\n")
        cg = TaskCgroup("web", "web", {"unified": str(d)}, False)
        try:
            drv.open()
            drv.apply(cg, 25)   # 25 % of 20 GB/s = 5e9 B/s = 4768.4 MiB/s
            assert fake.groups["rswap-web"]["MB"] == {0: 4769, 1: 4769}
            drv.apply(cg, 100)  # the whole domain: the unthrottled default
            assert fake.groups["rswap-web"]["MB"] == {0: 2**32 - 1, 1: 2**32 - 1}
        finally:
            drv.close()
            ctx.journal.restore()
    finally:
        fake.close()


def test_mba_mbps_mount_option_is_read_from_proc_mounts(tmp_path, monkeypatch):
    fake = FakeResctrl(str(tmp_path / "r"))
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "mounts").write_text(f"sysfs /sys sysfs rw 0 0\n"
                                 f"resctrl {fake.root} resctrl rw,relatime,mba_MBps 0 0\n")
    monkeypatch.setenv("RSWAP_PROCFS_ROOT", str(proc))
    try:
        assert resctrl.read_info(fake.root).mb_unit == resctrl.MB_MIBPS
        (proc / "mounts").write_text(f"resctrl {fake.root} resctrl rw,relatime 0 0\n")
        info = resctrl.read_info(fake.root)
        assert info.mb_unit == resctrl.MB_PERCENT and info.mb_value(35) == 40
    finally:
        fake.close()


def test_amd_without_a_peak_senses_against_the_maximum_it_writes_against(tmp_path, monkeypatch):
    fake = FakeResctrl(str(tmp_path / "r"), vendor="amd", amd_max_bw=2048, pids=(1, 500))
    monkeypatch.setenv("RSWAP_RESCTRL_ROOT", fake.root)
    ctx = _ctx(tmp_path / "a", "")
    try:
        drv = membwmod.make(ctx)
        # 2048 eighths of a GB/s: 50 % sensed = 128e9 B/s = what MB 1024 lets through.
        assert drv.peak_bytes_per_s == 256e9 and not drv.steered
        assert resctrl.read_info(fake.root).mb_value(50, drv.rs.enforcer.mb_peak_bytes_per_s) == 1024
    finally:
        ctx.journal.close()
        fake.close()
