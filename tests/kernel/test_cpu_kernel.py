"""The CPU slice on the real kernel: BPF accounting vs /proc, CFS quota enforcement, restore."""
from __future__ import annotations

import os
import subprocess
import time

import pytest

from rswap_ebpf.enforce.cgroup import CgroupManager, FileApplier, cpu_writer, detect_mounts
from rswap_ebpf.enforce.journal import Journal
from rswap_ebpf.sense.cpu import CpuCollector

from .helpers import busy_process, proc_cpu_s, scratch_cgroup


@pytest.fixture
def pin_dir(monkeypatch, unique_name):
    d = f"/sys/fs/bpf/test-{unique_name}"
    monkeypatch.setenv("RSWAP_PIN_DIR", d)
    yield d
    if os.path.isdir(d):
        for f in os.listdir(d):
            os.unlink(os.path.join(d, f))
        os.rmdir(d)


def test_bpf_measures_a_busy_loop_within_5_percent_of_proc(pin_dir, unique_name):
    with scratch_cgroup(f"rswap-test-{unique_name}") as dirs, CpuCollector() as col:
        cgid = os.stat(dirs["unified"]).st_ino
        with busy_process(list(dirs.values())) as p:
            time.sleep(0.3)
            col.drain()
            start = proc_cpu_s(p.pid)
            task_ns = cg_ns = 0
            for _ in range(3):
                time.sleep(1.0)
                d = col.drain()
                task_ns += d.task_ns.get(p.pid, 0)
                cg_ns += d.cgroup_ns.get(cgid, 0)
            used = proc_cpu_s(p.pid) - start
    assert used > 1.0, "the busy loop did not run"
    assert task_ns / 1e9 == pytest.approx(used, rel=0.05)
    assert cg_ns / 1e9 == pytest.approx(used, rel=0.05)


def test_maps_are_pinned_and_inspectable_with_bpftool(pin_dir):
    with CpuCollector() as col:
        for name in ("rswap_task_ns", "rswap_cgroup_ns"):
            path = os.path.join(pin_dir, name)
            out = subprocess.run(["bpftool", "map", "show", "pinned", path],
                                 capture_output=True, text=True)
            assert out.returncode == 0 and "percpu_hash" in out.stdout, out.stderr
        assert col.attach_point
    assert not os.path.exists(pin_dir)


def test_a_20_percent_limit_holds_and_restore_puts_the_original_back(tmp_path, unique_name):
    mounts = detect_mounts()
    name = f"rswap-test-{unique_name}"
    with scratch_cgroup(name) as dirs:
        writer = cpu_writer(mounts)
        journal = Journal(str(tmp_path / "journal.jsonl"))
        cgm = CgroupManager(journal, mounts)
        cg = cgm.resolve("limited", name)
        cgm.check_exists(cg)
        files = [p for p, _ in writer.plan(cg, 200)]
        originals = {p: open(p).read() for p in files}
        FileApplier(journal).apply(writer.plan(cg, 200))
        assert writer.current(cg) == 200
        with busy_process(list(dirs.values())) as p:
            time.sleep(0.5)
            t0, c0 = time.monotonic(), proc_cpu_s(p.pid)
            time.sleep(3.0)
            share = (proc_cpu_s(p.pid) - c0) / (time.monotonic() - t0)
        assert 0.15 <= share <= 0.25, f"busy loop got {share:.1%} under a 20% limit"
        report = journal.restore()
        assert not report.failed
        assert {p: open(p).read() for p in files} == originals
        assert writer.current(cg) is None  # unlimited again, as it was
        assert not os.path.exists(journal.path)


def test_owned_cgroups_and_moves_are_undone(tmp_path, unique_name):
    journal = Journal(str(tmp_path / "journal.jsonl"))
    cgm = CgroupManager(journal)
    cg = cgm.resolve(f"own-{unique_name}", None)
    with busy_process() as p:
        before = cgm.current_cgroups(p.pid)
        cgm.create(cg)
        cgm.move(cg, p.pid)
        assert p.pid in cg.pids()
        assert cg.cgroup_ids()
        journal.restore()
        assert cgm.current_cgroups(p.pid) == before
    assert not any(os.path.exists(d) for d in cg.dirs.values())
