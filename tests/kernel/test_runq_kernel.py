"""The run-queue delay collector on the real kernel, alone (bpf/runq.bpf.c) and sharing the CPU
collector's program (cpu.bpf.c's run-queue half): a sleeper that wakes every millisecond beside
spinners on every CPU shows its delays in its own cgroup and the spinners' preemption waits in
theirs, each as much as the kernel's own per-task run_delay (/proc/<pid>/schedstat) says; a
ping-pong shows every one of its wakeups once."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager

import pytest

from rswap_ebpf.host.cpu.collector import CpuCollector
from rswap_ebpf.host.cpu.runq import MAPS, RunqCollector

from .helpers import TIME_SCALE, busy_process, scratch_cgroup

WAKER = [sys.executable, "-c", "import time\nend=time.monotonic()+60\n"
         "while time.monotonic()<end: time.sleep(0.001)"]
SHARED, ALONE = "shared with cpu.bpf.c", "runq.bpf.c"


@pytest.fixture
def pin_dir(monkeypatch, unique_name):
    d = f"/sys/fs/bpf/test-{unique_name}"
    monkeypatch.setenv("RSWAP_PIN_DIR", d)
    yield d
    if os.path.isdir(d):
        for f in os.listdir(d):
            os.unlink(os.path.join(d, f))
        os.rmdir(d)


@contextmanager
def runq_collector(mode: str):
    """A run-queue collector in ``mode``: beside an open CPU collector whose program it shares
    (found the way the CPU driver's is: the newest open one), or loaded on its own."""
    with ExitStack() as stack:
        if mode == SHARED:
            stack.enter_context(CpuCollector())
        col = stack.enter_context(RunqCollector(alone=mode == ALONE))
        assert col.mode == mode
        yield col


def run_delay_ns(pid: int) -> int:
    """The kernel's own sum of the time ``pid`` waited runnable (schedstat's second field)."""
    return schedstat(pid)[0]


def schedstat(pid: int) -> tuple[int, int]:
    """(ns waited runnable, times run) of ``pid``'s main thread, as the kernel counts them."""
    with open(f"/proc/{pid}/schedstat") as f:
        _, waited, runs = (int(v) for v in f.read().split())
    return waited, runs


@pytest.mark.parametrize("mode", [SHARED, ALONE])
def test_delay_is_charged_to_the_woken_tasks_cgroup(pin_dir, unique_name, mode):
    ncpu = len(os.sched_getaffinity(0))
    with scratch_cgroup(f"rswap-test-{unique_name}-spin") as spin, \
            scratch_cgroup(f"rswap-test-{unique_name}-wake") as wake, \
            scratch_cgroup(f"rswap-test-{unique_name}-empty") as empty, runq_collector(mode) as col:
        ids = {k: os.stat(d["unified"]).st_ino for k, d in
               (("spin", spin), ("wake", wake), ("empty", empty))}
        for name in MAPS:
            assert os.path.exists(os.path.join(pin_dir, name)), f"{name} not pinned"
        # two spinners per CPU: each waits out the other's slice (a millisecond or more)
        with ExitStack() as stack:
            spinners = [stack.enter_context(busy_process(list(spin.values())))
                        for _ in range(2 * ncpu)]
            with busy_process(list(wake.values()), WAKER) as waker:
                time.sleep(0.5 * TIME_SCALE)
                col.drain()
                spun0 = sum(run_delay_ns(p.pid) for p in spinners)
                woke0 = schedstat(waker.pid)
                time.sleep(2.0 * TIME_SCALE)
                delta = col.drain()
                spun_kernel = sum(run_delay_ns(p.pid) for p in spinners) - spun0
                woke_kernel = [b - a for a, b in zip(woke0, schedstat(waker.pid))]
    woken, spun = delta.of([ids["wake"]]), delta.of([ids["spin"]])
    # ~2000 wakeups in 2 s (fewer under load, never none); each waited on a busy CPU
    assert woken.n > 200, f"sleeper's wakeups not seen: {woken}"
    assert woken.total_ns > 0 and woken.quantile_us(0.5) >= 1.0
    # the spinners never sleep: their delays are the other spinner's slices on the same CPU
    # (a preemption by the sleeper alone is microseconds)
    assert spun.n > 10 and spun.quantile_us(0.99) >= 1000.0, spun
    # as much waiting as the kernel counted for the same tasks over the same two seconds (a
    # delay is read when its task switches out again: the edges differ by a slice or so)
    assert spun.total_ns == pytest.approx(spun_kernel, rel=0.1)
    assert woken.n == pytest.approx(woke_kernel[1], rel=0.1), (woken, woke_kernel)
    assert woken.total_ns >= 0.8 * woke_kernel[0], (woken, woke_kernel)
    assert delta.of([ids["empty"]]).n == 0
    assert not delta.dropped.get("runq_hist_full")


def _schedstat() -> tuple[int, int]:
    """(ns waited runnable, times run) of the calling task, as the kernel counts them."""
    with open("/proc/thread-self/schedstat") as f:
        _, waited, runs = (int(v) for v in f.read().split())
    return waited, runs


def _ping_pong(seconds: float, cpu: int, cgroup: str) -> tuple[int, int, int]:
    """Two processes in ``cgroup`` pinned to ``cpu`` pass a byte back and forth for ``seconds``:
    every pass wakes the other one.  Returns the round trips, and the runs and the ns waited
    runnable the kernel counted for the two (schedstat, from each one's start in the cgroup to
    its exit)."""
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    rc, wc = os.pipe()

    def child(body):
        pid = os.fork()
        if pid:
            return pid
        try:
            os.sched_setaffinity(0, {cpu})
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
            waited, runs = _schedstat()
            n = body()
            waited2, runs2 = _schedstat()
            os.write(wc, b"".join(v.to_bytes(8, "little") for v in (n, runs2 - runs, waited2 - waited)))
        finally:
            os._exit(0)

    def pong():
        while os.read(r1, 1) == b"x":
            os.write(w2, b"x")
        return 0

    def ping():
        n, stop = 0, time.monotonic() + seconds
        while time.monotonic() < stop:
            os.write(w1, b"x")
            os.read(r2, 1)
            n += 1
        os.write(w1, b"q")
        return n

    for pid in [child(pong), child(ping)]:
        os.waitpid(pid, 0)
    out = [0, 0, 0]
    for _ in range(2):
        rec = os.read(rc, 24)
        for k in range(3):
            out[k] += int.from_bytes(rec[8 * k:8 * k + 8], "little")
    for fd in (r1, w1, r2, w2, rc, wc):
        os.close(fd)
    return out[0], out[1], out[2]


@pytest.mark.parametrize("mode", [SHARED, ALONE])
def test_a_ping_pong_shows_each_of_its_waits_once(pin_dir, unique_name, mode):
    with scratch_cgroup(f"rswap-test-{unique_name}") as dirs, runq_collector(mode) as col:
        cgid = os.stat(dirs["unified"]).st_ino
        col.drain()
        trips, runs, waited_ns = _ping_pong(1.0 * TIME_SCALE, max(os.sched_getaffinity(0)),
                                            dirs["unified"])
        hist = col.drain().of([cgid])
    assert trips > 1000 and runs >= 2 * trips, "the ping-pong did not run"
    # one delay per run the kernel counted (each run ends a wait: a wakeup, or a preemption by
    # whatever else ran there), and a few from before the children first read their counts
    assert runs - 2 <= hist.n <= runs + 12, (trips, runs, hist)
    assert hist.total_ns == pytest.approx(waited_ns, rel=0.1, abs=2e6)


def _loaded_programs() -> set[int]:
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True)
    return {p["id"] for p in json.loads(out.stdout)}


def test_sharing_adds_only_the_wakeup_programs_and_stops_cleanly(pin_dir, unique_name):
    with scratch_cgroup(f"rswap-test-{unique_name}") as dirs, CpuCollector() as cpu:
        cgid = os.stat(dirs["unified"]).st_ino
        before = _loaded_programs()
        with RunqCollector() as rq:
            added = _loaded_programs() - before
            assert rq.mode == SHARED and cpu.runq_shared
            assert len(added) == 2, added  # sched_wakeup and sched_wakeup_new, no sched_switch
            with busy_process(list(dirs.values())):
                time.sleep(0.3)
                assert rq.drain().of([cgid]).n >= 1  # at least its first run
        assert not cpu.runq_shared
        with busy_process(list(dirs.values())):
            cpu.drain()
            time.sleep(0.5)
            d = cpu.drain()
        assert d.cgroup_ns.get(cgid, 0) > 0.3e9  # the CPU collector still charges on its own
        with RunqCollector() as again:  # shared once more, stamps from the first time cleared
            assert again.mode == SHARED
            again.drain()
    with RunqCollector() as alone:  # no CPU collector open: its own program
        assert alone.mode == ALONE


@pytest.mark.parametrize("mode", [SHARED, ALONE])
def test_open_twice_and_close_leaves_no_pins(pin_dir, mode):
    with runq_collector(mode):
        pass
    with runq_collector(mode):
        pass
    assert not os.path.isdir(pin_dir) or not os.listdir(pin_dir)
