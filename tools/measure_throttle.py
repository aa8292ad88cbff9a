#!/usr/bin/env python3
"""How well use + throttled time shows a throttled task's CPU demand (needs root).

The CPU driver reads a throttled task's demand as the CPU it used plus the time its runnable
threads waited throttled (``cpu.stat``: ``throttled_time`` in v1, ``throttled_usec`` in v2), and
``rswap replay`` models that reading with :func:`rswap_ebpf.replay.throttled_reading`.  This runs
worker processes in a scratch cgroup, first uncapped (their demand), then held at each quota, and
prints the reading next to the demand and the model, so the model can be checked on a host.

Workers are time-bounded, as the shipped traces' jobs are: each loops for the duration, busy for
``duty`` of every 20 ms of work and asleep for the rest.  The cgroup is removed afterwards.

Usage: sudo .venv/bin/python tools/measure_throttle.py [--seconds 3] [--caps 200,500]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rswap_ebpf.enforce.cgroup import detect_mounts  # noqa: E402
from rswap_ebpf.enforce.journal import remove_cgroup_dir  # noqa: E402
from rswap_ebpf.replay import throttled_reading  # noqa: E402

#: (processes, share of each 20 ms slice busy): busy threads, and threads that also sleep
LOADS = ((2, 1.0), (1, 1.0), (1, 0.5), (2, 0.3))
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
            for _ in range(20):
                try:
                    remove_cgroup_dir(d)
                    break
                except OSError:
                    time.sleep(0.1)

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

    def run(self, procs: int, duty: float, seconds: float) -> tuple[float, float]:
        """(millicores used, millicores used + throttled) over ``seconds`` of the load."""
        u0, t0 = self.counters()
        w0 = time.monotonic()

        def enter():
            for d in self.dirs:
                _write(os.path.join(d, "cgroup.procs"), str(os.getpid()))

        ps = [subprocess.Popen([sys.executable, "-c", WORKER, str(seconds), str(duty)],
                               preexec_fn=enter) for _ in range(procs)]
        for p in ps:
            p.wait()
        wall = time.monotonic() - w0
        u1, t1 = self.counters()
        return (u1 - u0) / wall / 1e6, (u1 - u0 + t1 - t0) / wall / 1e6


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
    print(f"{'LOAD':<16} {'DEMAND':>7} {'CAP':>5} {'USED':>6} {'READING':>8} {'MODEL':>6} "
          f"{'READ/DEMAND':>11} {'MODEL ERR':>9}")
    with Scratch(f"rswap-measure-{os.getpid()}") as cg:
        for procs, duty in LOADS:
            load = f"{procs} x {duty:.0%} busy"
            cg.cap(None)
            demand, _ = cg.run(procs, duty, a.seconds)
            for c in caps:
                cg.cap(c)
                used, reading = cg.run(procs, duty, a.seconds)
                model = throttled_reading(demand, used, total)
                print(f"{load:<16} {demand:>7.0f} {c:>5} {used:>6.0f} {reading:>8.0f} "
                      f"{model:>6.0f} {reading / demand:>11.2f} "
                      f"{(model - reading) / reading:>+9.1%}")
        cg.cap(None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
