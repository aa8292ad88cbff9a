#!/usr/bin/env python3
"""How well use + throttled time shows a throttled task's CPU demand (needs root).

The CPU driver reads a throttled task's demand as the CPU it used plus the time its runnable
threads waited throttled (``cpu.stat``: ``throttled_time`` in v1, ``throttled_usec`` in v2), and
``rswap replay --reading`` models that reading (:func:`rswap_ebpf.offline.replay.throttled_reading`).
This runs loads in a scratch cgroup, first uncapped (their demand), then held at each quota, and
prints the kernel's reading next to the demand and the ``backlog`` model:

1. Steady loads, 3 s each: worker processes busy for a share of every 20 ms of work, rswap's
   demo spinners (the shipped traces' tasks), ``stress-ng --cpu-load`` where installed, ``dd``.
2. A burst's first tick: rswap's demo ``burst`` (2 workers, wall-clock phase-locked) measured
   over the 1 s window in which its burst begins, at several offsets into the window.

The cgroup is removed afterwards.

Usage: sudo .venv/bin/python tools/measure_throttle.py [--seconds 3] [--caps 200,500]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rswap_ebpf.host.cgroup import detect_mounts  # noqa: E402
from rswap_ebpf.host.journal import remove_cgroup_dir  # noqa: E402
from rswap_ebpf.offline.replay import throttled_reading  # noqa: E402

WORKER = """
import sys, time
end = time.monotonic() + float(sys.argv[1]); duty = float(sys.argv[2])
while time.monotonic() < end:
    t = time.thread_time() + 0.02 * duty
    while time.thread_time() < t: pass
    if duty < 1: time.sleep(0.02 * (1 - duty))
"""


class Scratch:
    """A cgroup in the cpu (and, on a hybrid host, cpuacct) hierarchy, removed on exit."""

    def __init__(self, name: str):
        m = detect_mounts()
        if "cpu" in m.v1:
            self.cpu = os.path.join(m.v1["cpu"], name)
            self.acct = os.path.join(m.v1.get("cpuacct", m.v1["cpu"]), name)
            self.v2 = False
        elif m.unified and "cpu" in m.v2_controllers():
            self.cpu = self.acct = os.path.join(m.unified, name)
            self.v2 = True
        else:
            raise SystemExit("no cgroup cpu controller here: nothing to measure")
        self.dirs = sorted({self.cpu, self.acct})

    def __enter__(self):
        for d in self.dirs:
            os.makedirs(d, exist_ok=True)
        return self

    def __exit__(self, *exc):
        for d in self.dirs:
            remove_cgroup_dir(d)  # moves what is left to the parent, waits out EBUSY

    def cap(self, millicores: int | None) -> None:
        if self.v2:
            period = open(os.path.join(self.cpu, "cpu.max")).read().split()[1]
            quota = "max" if millicores is None else str(millicores * int(period) // 1000)
            _write(os.path.join(self.cpu, "cpu.max"), f"{quota} {period}")
        else:
            period = int(open(os.path.join(self.cpu, "cpu.cfs_period_us")).read())
            quota = -1 if millicores is None else millicores * period // 1000
            _write(os.path.join(self.cpu, "cpu.cfs_quota_us"), str(quota))

    def counters(self) -> tuple[int, int]:
        """(CPU used, throttled time), ns."""
        stat = dict(line.split() for line in open(os.path.join(self.cpu, "cpu.stat")))
        throttled = (int(stat["throttled_usec"]) * 1000 if "throttled_usec" in stat
                     else int(stat["throttled_time"]))
        if self.v2:
            used = int(stat["usage_usec"]) * 1000
        else:
            used = int(open(os.path.join(self.acct, "cpuacct.usage")).read())
        return used, throttled

    def enter(self) -> None:
        """In a child before exec: join the cgroup."""
        for d in self.dirs:
            _write(os.path.join(d, "cgroup.procs"), str(os.getpid()))

    def run(self, argvs: list[list[str]]) -> tuple[float, float]:
        """(millicores used, millicores used + throttled) while the commands run."""
        u0, t0 = self.counters()
        w0 = time.monotonic()
        ps = [subprocess.Popen(a, preexec_fn=self.enter, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL) for a in argvs]
        for p in ps:
            p.wait()
        wall = time.monotonic() - w0
        u1, t1 = self.counters()
        return (u1 - u0) / wall / 1e6, (u1 - u0 + t1 - t0) / wall / 1e6

    def window(self, start: float, cap: int | None, length: float = 1.0) -> tuple[float, float]:
        """(used, used + throttled) over [start, start + length) of the wall clock, the cap set
        half a second before (while the load is between bursts)."""
        time.sleep(max(0.0, start - 0.5 - time.time()))
        self.cap(cap)
        time.sleep(max(0.0, start - time.time()))
        u0, t0 = self.counters()
        w0 = time.monotonic()
        time.sleep(length)
        u1, t1 = self.counters()
        wall = time.monotonic() - w0
        return (u1 - u0) / wall / 1e6, (u1 - u0 + t1 - t0) / wall / 1e6


def steady_loads(seconds: float) -> list[tuple[str, list[list[str]]]]:
    py, s = sys.executable, f"{seconds:g}"
    worker = [py, "-c", WORKER, s]
    demo = [py, "-m", "rswap_ebpf.demo", "spin", "--seconds", s]
    loads = [("2 threads, busy", [worker + ["1"]] * 2), ("1 thread, busy", [worker + ["1"]]),
             ("1 thread, 50% busy", [worker + ["0.5"]]),
             ("2 threads, 30% busy", [worker + ["0.3"]] * 2),
             ("demo spin 1 x 0.6", [demo + ["--workers", "1", "--duty", "0.6"]]),
             ("demo spin 2 x 0.75", [demo + ["--workers", "2", "--duty", "0.75"]])]
    if shutil.which("stress-ng"):
        loads.append(("stress-ng load 50%", [["stress-ng", "--cpu", "1", "--cpu-load", "50",
                                              "--timeout", f"{seconds:g}s"]]))
    if shutil.which("dd") and shutil.which("timeout"):
        loads.append(("dd 64k blocks", [["timeout", s, "dd", "if=/dev/zero", "of=/dev/null",
                                        "bs=64k"]]))
    return loads


def onsets(cg: Scratch, caps: list[int], offsets=(0.9, 0.7, 0.4, 0.0), period: float = 4.0):
    """The demo's burst (2 workers at 0.75, 1.5 s of every ``period``), measured over the
    second in which it begins ``offset`` s in: uncapped, then at each cap."""
    total = (os.cpu_count() or 1) * 1000
    cmd = [sys.executable, "-m", "rswap_ebpf.demo", "burst", "--period", f"{period:g}",
           "--busy", "1.5", "--workers", "2", "--duty", "0.75", "--seconds",
           f"{period * (len(offsets) * (len(caps) + 1) + 2):g}"]
    p = subprocess.Popen(cmd, preexec_fn=cg.enter)
    try:
        time.sleep(1.0)
        for off in offsets:
            runs = []
            for c in [None] + caps:
                k = int((time.time() + 1.0) // period) + 1  # the next burst with 1 s to spare
                runs.append((c, *cg.window(k * period - off, c)))
            demand = runs[0][1]
            for c, used, reading in runs[1:]:
                model = throttled_reading(demand, max(used, 1.0), total)
                print(f"{f'begins {off:g} s in':<20} {demand:>7.0f} {c:>5} {used:>6.0f} "
                      f"{reading:>8.0f} {model:>8.0f} {reading / demand:>11.2f}")
    finally:
        p.kill()
        p.wait()


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=3.0, help="each run's length (default 3)")
    p.add_argument("--caps", default="200,500", help="quotas to hold the load at, millicores")
    a = p.parse_args()
    if os.geteuid() != 0:
        print("measure_throttle: needs root (it makes a cgroup and sets its quota)",
              file=sys.stderr)
        return 1
    caps = [int(c) for c in a.caps.split(",")]
    total = (os.cpu_count() or 1) * 1000
    head = (f"{'DEMAND':>7} {'CAP':>5} {'USED':>6} {'READING':>8} {'BACKLOG':>8} "
            f"{'READ/DEMAND':>11}")
    with Scratch(f"rswap-measure-{os.getpid()}") as cg:
        print(f"{'STEADY LOAD':<20} {head} {'BACKLOG ERR':>11}")
        for label, argvs in steady_loads(a.seconds):
            cg.cap(None)
            demand, _ = cg.run(argvs)
            for c in caps:
                cg.cap(c)
                used, reading = cg.run(argvs)
                model = throttled_reading(demand, used, total)
                print(f"{label:<20} {demand:>7.0f} {c:>5} {used:>6.0f} {reading:>8.0f} "
                      f"{model:>8.0f} {reading / demand:>11.2f} "
                      f"{(model - reading) / reading:>+11.1%}")
        print(f"\n{'BURST ONSET (1 s)':<20} {head}")
        onsets(cg, [10, 100])
        cg.cap(None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
