"""Block sense and enforce on a loop device this test creates (real BPF, real blkio throttling)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from rswap_ebpf.host.io.enforcer import IoEnforcer, IoLimit, io_writer, resolve_device
from rswap_ebpf.host.cgroup import CgroupManager, detect_mounts
from rswap_ebpf.host.journal import Journal
from rswap_ebpf.host.io.collector import BlockCollector, kdev
from tests.kernel.helpers import root_controllers


@pytest.fixture
def loopdev(tmp_path):
    img = tmp_path / "disk.img"
    subprocess.run(["truncate", "-s", "32M", str(img)], check=True)
    dev = subprocess.run(["losetup", "--find", "--show", str(img)], capture_output=True,
                         text=True, check=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.fixture
def pin_dir(unique_name, monkeypatch):
    d = f"/sys/fs/bpf/rswap-test-{unique_name}"
    monkeypatch.setenv("RSWAP_PIN_DIR", d)
    yield d
    assert not os.path.exists(d), f"pins left behind in {d}: {os.listdir(d)}"


@pytest.fixture
def task_cgroup(rswap_env, unique_name):
    """rswap's own cgroup for a task (unified for identity, blkio for limits), journalled."""
    journal = Journal(os.path.join(rswap_env["state"], "journal.jsonl"))
    mgr = CgroupManager(journal, detect_mounts())
    cg = mgr.resolve(f"blk-{unique_name}", None)
    mgr.create(cg)
    try:
        yield journal, cg
    finally:
        report = journal.restore()
        assert not report.failed, report.failed
        assert not any(os.path.exists(d) for d in cg.dirs.values())


def run_in(cg, argv) -> subprocess.CompletedProcess:
    procs = [os.path.join(d, "cgroup.procs") for d in cg.dirs.values()]

    def enter():
        for p in procs:
            with open(p, "w") as f:
                f.write(str(os.getpid()))

    return subprocess.run(argv, preexec_fn=enter, capture_output=True, text=True, timeout=60)


def devno(path: str) -> int:
    st = os.stat(path)
    return kdev(os.major(st.st_rdev), os.minor(st.st_rdev))


def test_block_counts_agree_with_dd_direct(loopdev, pin_dir, task_cgroup):
    journal, cg = task_cgroup
    dev = devno(loopdev)
    writes, reads = 1500, 400
    with BlockCollector() as col:
        assert col.attach_points[0] == "tracepoint:block:block_rq_issue"
        # Debian 6.1 issues these O_DIRECT writes from kblockd (a plug flushed when dd sleeps):
        # only the owner recorded at block_getrq charges them to dd's cgroup.
        assert "tracepoint:block:block_getrq" in col.attach_points
        assert sorted(os.listdir(pin_dir)) == ["rswap_io_cgroup", "rswap_io_stats", "rswap_io_task"]
        col.drain()
        w = run_in(cg, ["dd", "if=/dev/zero", f"of={loopdev}", "bs=4k", f"count={writes}",
                        "oflag=direct"])
        assert w.returncode == 0, w.stderr
        r = run_in(cg, ["dd", f"if={loopdev}", "of=/dev/null", "bs=16k", f"count={reads}",
                        "iflag=direct"])
        assert r.returncode == 0, r.stderr
        time.sleep(0.1)
        delta = col.drain()
    ids = cg.cgroup_ids()
    mine = delta.for_cgroups(ids, dev)
    assert mine.writes == pytest.approx(writes, rel=0.05)
    assert mine.reads == pytest.approx(reads, rel=0.05)
    assert mine.write_bytes == pytest.approx(writes * 4096, rel=0.05)
    assert mine.read_bytes == pytest.approx(reads * 16384, rel=0.05)
    # Completions find their request, so service time is charged to the same owner.
    assert mine.completed == pytest.approx(writes + reads, rel=0.05)
    assert mine.service_ns > 0
    # The device total sees them too, and no other cgroup issued to our private device.
    assert delta.per_device()[dev].requests == pytest.approx(writes + reads, rel=0.05)
    # Per task: one dd process did (nearly) all the writes.
    per_tgid = [c.writes for (tgid, d), c in delta.task.items() if d == dev]
    assert max(per_tgid) == pytest.approx(writes, rel=0.05)
    assert not delta.dropped


def dd_seconds(result: subprocess.CompletedProcess) -> float:
    """The copy time dd reports itself ("... copied, 2.5 s, ..."): without its own start, which in
    an emulated VM takes a good part of a second and read as a rate below the cap."""
    m = re.search(r"copied, ([0-9.e+-]+) s", result.stderr)
    assert m, result.stderr
    return float(m.group(1))


def test_block_iops_limit_caps_dd(loopdev, task_cgroup):
    journal, cg = task_cgroup
    mounts = detect_mounts()
    dev = resolve_device(loopdev)
    enforcer = IoEnforcer(journal, io_writer(mounts))
    # 200 IO/s, or a third of what this machine does unthrottled where that is less (a software-
    # emulated VM runs dd at a few hundred IO/s): the cap, not the CPU, must set the pace.
    free = run_in(cg, ["dd", "if=/dev/zero", f"of={loopdev}", "bs=4k", "count=300", "oflag=direct"])
    assert free.returncode == 0, free.stderr
    limit = min(200, int(300 / dd_seconds(free) / 3))
    enforcer.apply(cg, dev, IoLimit.iops(limit))
    assert enforcer.current(cg, dev) == IoLimit(riops=limit, wiops=limit)
    count = int(limit * 2.5)
    w = run_in(cg, ["dd", "if=/dev/zero", f"of={loopdev}", "bs=4k", f"count={count}", "oflag=direct"])
    assert w.returncode == 0, w.stderr
    assert count / dd_seconds(w) == pytest.approx(limit, rel=0.10)
    # Reads are capped the same way.
    r = run_in(cg, ["dd", f"if={loopdev}", "of=/dev/null", "bs=4k", f"count={count}", "iflag=direct"])
    assert r.returncode == 0, r.stderr
    assert count / dd_seconds(r) == pytest.approx(limit, rel=0.10)
    enforcer.restore()
    assert enforcer.current(cg, dev) == IoLimit()


@pytest.fixture
def adopted_cgroup(rswap_env, unique_name):
    """A cgroup the operator made (rswap adopts it, so restore must leave it, limits undone)."""
    journal = Journal(os.path.join(rswap_env["state"], "journal.jsonl"))
    mgr = CgroupManager(journal, detect_mounts())
    cg = mgr.resolve(f"adopt-{unique_name}", f"rswap-test-{unique_name}")
    with root_controllers():
        for d in cg.dirs.values():
            os.mkdir(d)
        try:
            yield journal, cg
        finally:
            for d in cg.dirs.values():
                os.rmdir(d)


def test_block_limit_restored_by_journal_and_hand_edit_respected(loopdev, adopted_cgroup):
    journal, cg = adopted_cgroup
    dev = resolve_device(loopdev)
    writer = io_writer(detect_mounts())
    enforcer = IoEnforcer(journal, writer)
    enforcer.apply(cg, dev, IoLimit.iops(300))
    enforcer.apply(cg, dev, IoLimit.iops(150))
    assert writer.current(cg, dev).wiops == 150
    # An administrator sets the write limit by hand: rswap backs off from that file's line for
    # the device.  v1 keeps each limit in its own file, so the read limit still follows; v2 keeps
    # all four in one io.max line, so rswap leaves that whole line alone.
    if writer.version == "v1":
        wfile, text, expect = "blkio.throttle.write_iops_device", f"{dev.majmin} 999", (400, 999)
    else:
        wfile, text, expect = "io.max", f"{dev.majmin} wiops=999", (150, 999)
    with open(os.path.join(cg.dirs["blkio" if writer.version == "v1" else "unified"], wfile), "w") as f:
        f.write(text)
    enforcer.apply(cg, dev, IoLimit.iops(400))
    now = writer.current(cg, dev)
    assert (now.riops, now.wiops) == expect
    # A fresh process replays the journal (what `rswap restore` does): originals come back.
    out = subprocess.run([os.sys.executable, "-c",
                          "import sys; from rswap_ebpf.host.journal import Journal; "
                          "r = Journal(sys.argv[1]).restore(); print(r.failed)",
                          journal.path], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
    assert writer.current(cg, dev) == IoLimit()


#: a synchronous O_DIRECT writer paced at a rate (as ``fio --rate_iops`` paces the shipped
#: ``fio_flush`` trace's flush): says "ready" once its device is open, then writes for argv[3] s
PACED_WRITER = """
import mmap, os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 4096); rate = float(sys.argv[2]); end = float(sys.argv[3])
print("ready", flush=True)
t0 = time.monotonic(); n = 0
while time.monotonic() - t0 < end:
    due = t0 + n / rate
    if due > time.monotonic(): time.sleep(due - time.monotonic())
    os.pwritev(fd, [buf], 4096 * (n % 4000)); n += 1
"""


def waiting_share(cg, device: str, rate: int, seconds: float = 1.5) -> float:
    """The share of samples (about every ms) in which the paced writer, in ``cg``, was in
    uninterruptible sleep."""
    procs = [os.path.join(d, "cgroup.procs") for d in cg.dirs.values()]

    def enter():
        for p in procs:
            with open(p, "w") as f:
                f.write(str(os.getpid()))
    p = subprocess.Popen([sys.executable, "-c", PACED_WRITER, device, str(rate),
                          str(seconds + 1.0)], preexec_fn=enter, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.3)  # past its first IOs
        states = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            with open(f"/proc/{p.pid}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
            time.sleep(0.001)
    finally:
        p.wait(timeout=30)
    assert p.returncode == 0
    return states.count("D") / len(states)


def test_a_held_writer_waits_all_the_time_whatever_it_wanted(loopdev, task_cgroup):
    """Why IO keeps the growth rule (README, round 8; tools/measure_io_wait.py): CPU's throttled
    time says how much a cap held back, but a writer held below the rate it is paced at waits on
    the throttle nearly all the time at any cap.  Its wait says that it is held, not by how much,
    so no demand can be read from it."""
    journal, cg = task_cgroup
    enforcer = IoEnforcer(journal, io_writer(detect_mounts()))
    dev = resolve_device(loopdev)
    free = waiting_share(cg, loopdev, 100)
    held = {}
    for cap in (50, 10):
        enforcer.apply(cg, dev, IoLimit.iops(cap))
        held[cap] = waiting_share(cg, loopdev, 100)
    enforcer.restore()
    assert enforcer.current(cg, dev) == IoLimit()
    assert free < 0.5, free
    assert held[50] > 0.9 and held[10] > 0.9, held
