"""Tier shapes on the real kernel: burst and weight for critical, cpu.idle for batch, restored."""
from __future__ import annotations

import os

import pytest

from rswap_ebpf.host.cgroup import CgroupManager, FileApplier, detect_mounts
from rswap_ebpf.host.cpu.writer import CpuShape, burst_supported, cpu_writer
from rswap_ebpf.host.journal import Journal

from .helpers import scratch_cgroup


def _read(d: str, name: str) -> str:
    with open(os.path.join(d, name)) as f:
        return f.read().strip()


def _setup(tmp_path, name):
    mounts = detect_mounts()
    writer = cpu_writer(mounts)
    journal = Journal(str(tmp_path / "journal.jsonl"))
    cgm = CgroupManager(journal, mounts)
    return writer, journal, cgm


def test_critical_burst_follows_the_quota_up_and_down_and_is_restored(tmp_path, unique_name):
    name = f"rswap-test-{unique_name}"
    # Probed in the scratch cgroup, whose parent enables the cpu controller: on a unified host
    # where systemd leaves cpu off at the root, no cgroup has cpu.max.burst for burst_supported()
    # to find, though the kernel has it (Debian 12's 6.1 does).
    with scratch_cgroup(name):
        writer, journal, cgm = _setup(tmp_path, name)
        cg = cgm.resolve("svc", name)
        d = writer._dir(cg)
        files = ("cpu.cfs_quota_us", "cpu.cfs_burst_us", "cpu.shares") if writer.version == "v1" \
            else ("cpu.max", "cpu.max.burst", "cpu.weight")
        if not os.path.exists(os.path.join(d, files[1])):
            pytest.skip(f"this kernel has no CFS burst ({d} has no {files[1]}: kernel before 5.14 "
                        "or CONFIG_CFS_BANDWIDTH off)")
        assert burst_supported(detect_mounts()) == files[1]
        before = {f: _read(d, f) for f in files}
        applier = FileApplier(journal)
        shape = CpuShape(burst=True, weight=8.0)
        # up, then down below the burst the kernel holds (it refuses burst > quota): both orders
        for millicores in (400, 100, 250):
            applier.apply(writer.plan(cg, millicores, shape))
            assert writer.current(cg) == millicores
            quota_us = int(_read(d, files[0]).split()[0])
            assert int(_read(d, files[1])) == quota_us
        if writer.version == "v1":
            assert int(_read(d, "cpu.shares")) == 250 * 1024 * 8 // 1000
        report = journal.restore()
        assert not report.failed
        assert {f: _read(d, f) for f in files} == before


def test_batch_group_runs_sched_idle_and_is_restored(tmp_path, unique_name):
    name = f"rswap-test-{unique_name}"
    with scratch_cgroup(name):
        writer, journal, cgm = _setup(tmp_path, name)
        cg = cgm.resolve("batch", name)
        d = writer._dir(cg)
        if not os.path.exists(os.path.join(d, "cpu.idle")):
            pytest.skip("this kernel has no cpu.idle")
        FileApplier(journal).apply(writer.plan(cg, 1500, CpuShape(idle=True)))
        assert _read(d, "cpu.idle") == "1"
        assert writer.current(cg) == 1500
        assert not journal.restore().failed
        assert _read(d, "cpu.idle") == "0"
