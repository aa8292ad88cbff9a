"""The CPU slice on the real kernel: BPF accounting vs /proc, CFS quota enforcement, restore."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from contextlib import ExitStack

import pytest

from rswap_ebpf.host import bpf
from rswap_ebpf.host.cpu.driver import CpuDriver
from rswap_ebpf.host.cgroup import CgroupManager, FileApplier, detect_mounts
from rswap_ebpf.host.cpu.writer import cpu_writer
from rswap_ebpf.host.journal import Journal
from rswap_ebpf.offline.replay import throttled_reading
from rswap_ebpf.host.cpu.collector import CpuCollector

from .helpers import BUSY, CLK_TCK, TIME_SCALE, busy_process, proc_cpu_s, scratch_cgroup

def PINNED_BUSY(cpu: int) -> list[str]:
    """:data:`BUSY` held to one CPU."""
    return [BUSY[0], "-c", f"import os\nos.sched_setaffinity(0, {{{cpu}}})\n" + BUSY[2]]


#: Busy for half of every 20 ms of work, asleep for the rest, for 60 s at most.
HALF_BUSY = [sys.executable, "-c", "import time\nend=time.monotonic()+60\n"
             "while time.monotonic()<end:\n t=time.thread_time()+0.01\n"
             " while time.thread_time()<t: pass\n time.sleep(0.01)"]


@pytest.fixture
def pin_dir(monkeypatch, unique_name):
    d = f"/sys/fs/bpf/test-{unique_name}"
    monkeypatch.setenv("RSWAP_PIN_DIR", d)
    yield d
    if os.path.isdir(d):
        for f in os.listdir(d):
            os.unlink(os.path.join(d, f))
        os.rmdir(d)


@pytest.fixture(params=["per-cpu cache", "direct"])
def cpu_collector(request, monkeypatch):
    """The collector in each of its modes: the per-CPU cache synced at drain (the kernel runs
    BPF_F_TEST_RUN_ON_CPU) and the fallback that charges the hashes at every switch."""
    if request.param == "direct":
        def refused(fd, cpu):
            raise OSError(errno.EINVAL, "Invalid argument")

        monkeypatch.setattr(bpf, "test_run_on_cpu", refused)
    col = CpuCollector()
    yield col
    assert col.mode in ("", request.param)


def test_bpf_measures_a_busy_loop_within_5_percent_of_proc(pin_dir, unique_name, cpu_collector):
    with scratch_cgroup(f"rswap-test-{unique_name}") as dirs, cpu_collector as col:
        cgid = os.stat(dirs["unified"]).st_ino
        with busy_process(list(dirs.values())) as p:
            col.watch(p.pid)  # per-process sums are kept for watched tgids only
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


def test_more_cgroups_than_per_cpu_slots_are_each_charged_within_5_percent(pin_dir, unique_name,
                                                                          cpu_collector):
    """Six busy loops in six cgroups on one CPU: every switch changes the cgroup and the four
    per-CPU slots keep evicting, yet each cgroup reads what /proc says its process ran."""
    n = 6
    with ExitStack() as stack:
        groups = [stack.enter_context(scratch_cgroup(f"rswap-test-{unique_name}-{i}"))
                  for i in range(n)]
        col = stack.enter_context(cpu_collector)
        cpu = min(os.sched_getaffinity(0))
        procs = [stack.enter_context(busy_process(list(g.values()), PINNED_BUSY(cpu)))
                 for g in groups]
        cgids = [os.stat(g["unified"]).st_ino for g in groups]
        time.sleep(0.3)
        # /proc is read just before and just after the first and the last drain: what the
        # drains between count lies between the two readings.  Reading six processes takes
        # long enough in an emulated guest (tools/vm_test) that one reading after each drain
        # was 67 ms of a process's run time off.
        before0 = [proc_cpu_s(p.pid) for p in procs]
        col.drain()
        after0 = [proc_cpu_s(p.pid) for p in procs]
        got = [0] * n
        for i in range(3):
            time.sleep(1.0)
            if i == 2:
                before1 = [proc_cpu_s(p.pid) for p in procs]
            d = col.drain()
            got = [g + d.cgroup_ns.get(c, 0) for g, c in zip(got, cgids)]
        after1 = [proc_cpu_s(p.pid) for p in procs]
    lo = [b - a for b, a in zip(before1, after0)]
    hi = [a - b for a, b in zip(after1, before0)]
    assert sum(lo) > 1.5, "the busy loops did not run"
    for ns, low, high in zip(got, lo, hi):
        assert low * 0.95 - 0.02 <= ns / 1e9 <= high * 1.05 + 0.02, (ns / 1e9, low, high)


def test_only_watched_processes_are_accounted_by_tgid(pin_dir, unique_name):
    with scratch_cgroup(f"rswap-test-{unique_name}") as dirs, CpuCollector() as col:
        cgid = os.stat(dirs["unified"]).st_ino
        with busy_process(list(dirs.values())) as watched, busy_process(list(dirs.values())) as other:
            col.watch(watched.pid)
            col.drain()
            time.sleep(0.5)
            t0 = time.monotonic_ns()
            d = col.drain()
            col.unwatch(watched.pid)
            # Run time charged between that drain's sync and the unwatch is the watched
            # process's and comes with the next drain: microseconds here, 8 ms once in an
            # emulated guest (tools/vm_test).  Nothing after the unwatch may be charged.
            pending_ns = time.monotonic_ns() - t0
            time.sleep(max(0.2, 3 * pending_ns / 1e9))
            after = col.drain()
    assert d.task_ns.get(watched.pid, 0) > 0.1e9
    assert other.pid not in d.task_ns
    assert after.task_ns.get(watched.pid, 0) <= pending_ns, (after.task_ns, pending_ns)
    assert d.cgroup_ns[cgid] >= d.task_ns[watched.pid]


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


def _ticks(drv, tasks, n):
    """``n`` daemon-like ticks of the driver: (used, censored, withheld) of the last one."""
    for _ in range(n):
        time.sleep(1.0 * TIME_SCALE)
        used = drv.measure(tasks)["t"]
        censored = drv.censored(tasks).get("t")
        withheld = drv.withheld(tasks).get("t")
    return used, censored, withheld


def _busy_mc() -> float:
    """Millicore-seconds the whole host has been busy (``/proc/stat``: all but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) * 1000.0 / CLK_TCK


def _quiet_ticks(drv, tasks, n, tries=5):
    """:func:`_ticks` on a host where nothing but the task ran: the reading is exact only then.

    Under CPU contention from outside the group a throttled task also waits on the runqueue, and
    ``cpu.stat`` counts only the time its quota held it (two unmanaged busy loops on this 2-vCPU
    VM took a busy task's reading from 1000 to about 500 millicores).  A shared CI host has such
    seconds now and then (the test needed its one rerun in two of round 8's three CI runs), so
    a tick in which the rest of the host was busy is measured again, up to ``tries`` times.
    """
    for _ in range(tries):
        b0, t0 = _busy_mc(), time.monotonic()
        used, censored, withheld = _ticks(drv, tasks, n)
        others = (_busy_mc() - b0) / (time.monotonic() - t0) - used
        if others < 150.0:
            return used, censored, withheld
    raise AssertionError(f"the host was busy with other work through {tries} tries "
                         f"({others:.0f} millicores besides the task): measure on a quiet host")


@pytest.mark.parametrize("load", ["busy", "half"])
def test_a_throttled_task_reads_as_what_it_waited_for(tmp_path, pin_dir, unique_name, load):
    """The CPU driver's reading of a throttled task (BPF use + ``cpu.stat``'s throttled time)
    against its demand measured uncapped, and against replay's ``backlog`` model of it: a busy
    loop held at 200 millicores reads as the whole CPU it wanted (not the growth rule's 400), a
    half-busy one as its demand plus the half of a CPU its backlog kept it runnable for."""
    mounts = detect_mounts()
    name = f"rswap-test-{unique_name}"
    with scratch_cgroup(name) as dirs:
        journal = Journal(str(tmp_path / "journal.jsonl"))
        cgm = CgroupManager(journal, mounts)
        cg = cgm.resolve("t", name)
        drv = CpuDriver(mounts, FileApplier(journal), CpuCollector())
        drv.open()
        try:
            with busy_process(list(dirs.values()), BUSY if load == "busy" else HALF_BUSY):
                demand, censored, withheld = _quiet_ticks(drv, {"t": cg}, 2)
                assert not censored and withheld is None, "uncapped, yet throttled"
                drv.apply(cg, 200)
                _ticks(drv, {"t": cg}, 1)  # the tick the quota came in
                used, censored, withheld = _quiet_ticks(drv, {"t": cg}, 1)
        finally:
            drv.close()
            assert not journal.restore().failed
    expect = 1000.0 if load == "busy" else 500.0
    assert demand == pytest.approx(expect, rel=0.15), "the load did not run as meant"
    assert censored is True and withheld is not None
    assert used == pytest.approx(200, rel=0.25)
    reading = used + withheld
    if load == "busy":
        assert reading == pytest.approx(1000.0, rel=0.12)
    else:
        assert demand * 1.2 < reading < 1100.0  # more than its demand: its backlog waited too
    # replay --reading backlog for this task at this cap (tools/measure_throttle.py: more)
    assert reading == pytest.approx(throttled_reading(demand, used, 2000, "backlog"), rel=0.15)
