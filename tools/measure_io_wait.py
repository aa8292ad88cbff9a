#!/usr/bin/env python3
"""Does a throttled block writer show how much IO it wanted?  (Needs root.)

CPU has such a reading: ``cpu.stat``'s throttled time, the time runnable threads waited on
the quota (``tools/measure_throttle.py``).  Cgroup v1 ``blkio.throttle`` counts only the IO
it served, and holds a bio before the block tracepoints see it (the bio is issued later, from
a kworker).  What is left to look at is how the writer waits.  This runs a synchronous
O_DIRECT writer, paced at a rate (as ``fio --rate_iops`` paces the shipped ``fio_flush``
trace's flush), on a scratch loop device, in a scratch cgroup, uncapped and then held at
several IO/s caps, and prints per run:

* served: IO/s ``blkio.throttle.io_serviced`` counted;
* D: the share of samples (about every 0.5 ms, from ``/proc/PID/stat``) in which the writer
  was in uninterruptible sleep, and where (``wchan``);
* ``io.pressure`` some: the share of time its cgroup2 directory reports stalled on IO;
* served / (1 - share), for both: the demand if the writer's own time between IOs stayed the
  same when held back (a writer that thinks, then waits on one IO at a time).

The loop device, its backing file and both cgroup directories are removed afterwards.

Usage: sudo .venv/bin/python tools/measure_io_wait.py [--seconds 2] [--caps 250,100,50,10]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rswap_ebpf.host.cgroup import detect_mounts  # noqa: E402
from rswap_ebpf.host.journal import remove_cgroup_dir  # noqa: E402
from tools.record_traces import loop_device  # noqa: E402

WRITER = """
import mmap, os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 4096); rate = float(sys.argv[2]); end = float(sys.argv[3])
t0 = time.monotonic(); n = 0
while time.monotonic() - t0 < end:
    due = t0 + n / rate
    if due > time.monotonic(): time.sleep(due - time.monotonic())
    os.pwritev(fd, [buf], 4096 * (n % 60000)); n += 1
"""
NAME = "rswap_measure_io"


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _some_us(unified: str) -> int:
    with open(os.path.join(unified, "io.pressure")) as f:
        for line in f:
            if line.startswith("some"):
                return int(line.rsplit("total=", 1)[1])
    return 0


def _served(blkio: str, majmin: str) -> int:
    with open(os.path.join(blkio, "blkio.throttle.io_serviced")) as f:
        for line in f:
            parts = line.split()
            if parts[:2] == [majmin, "Write"]:
                return int(parts[2])
    return 0


def run(dev: str, majmin: str, blkio: str, unified: str, cap: int, rate: int,
        seconds: float) -> str:
    _write(os.path.join(blkio, "blkio.throttle.write_iops_device"), f"{majmin} {cap}")
    join = f"echo $$ > {unified}/cgroup.procs; echo $$ > {blkio}/cgroup.procs; "
    p = subprocess.Popen(["sh", "-c", join + 'exec "$0" -c "$1" "$2" "$3" "$4"',
                          sys.executable, WRITER, dev, str(rate), str(seconds + 1.5)])
    try:
        time.sleep(1.0)  # started, in both cgroups, and past its first IOs
        states, where = collections.Counter(), collections.Counter()
        s0, n0, t0 = _some_us(unified), _served(blkio, majmin), time.monotonic()
        while time.monotonic() - t0 < seconds:
            with open(f"/proc/{p.pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            states[state] += 1
            if state == "D":
                with open(f"/proc/{p.pid}/wchan") as f:
                    where[f.read() or "?"] += 1
            time.sleep(0.0005)
        s1, n1, t1 = _some_us(unified), _served(blkio, majmin), time.monotonic()
    finally:
        p.wait()
    wall = t1 - t0
    served = (n1 - n0) / wall
    some = (s1 - s0) / 1e6 / wall
    d = states["D"] / max(1, sum(states.values()))
    top = where.most_common(1)[0][0] if where else "-"
    return (f"{cap if cap else 'none':>6} {rate:>6} {served:>8.1f} {d:>6.3f} {top:<18.18} "
            f"{some:>6.3f} {served / max(1e-3, 1 - d):>12.0f} {served / max(1e-3, 1 - some):>12.0f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--caps", default="250,100,50,10", help="IO/s caps, comma separated")
    p.add_argument("--rates", default="300,80", help="IO/s the writer wants, comma separated")
    a = p.parse_args()
    m = detect_mounts()
    if "blkio" not in m.v1 or not m.unified:
        raise SystemExit("needs cgroup v1 blkio and a cgroup2 mount (a hybrid host)")
    blkio, unified = os.path.join(m.v1["blkio"], NAME), os.path.join(m.unified, NAME)
    caps = [0] + [int(c) for c in a.caps.split(",") if c]
    with tempfile.TemporaryDirectory(prefix="rswap-io-wait-") as tmp, loop_device(tmp) as dev, \
            contextlib.ExitStack() as stack:
        majmin = subprocess.run(["lsblk", "-dno", "MAJ:MIN", dev], check=True,
                                capture_output=True, text=True).stdout.strip()
        for d in (blkio, unified):
            os.makedirs(d, exist_ok=True)
            stack.callback(remove_cgroup_dir, d)
        stack.callback(_write, os.path.join(blkio, "blkio.throttle.write_iops_device"),
                       f"{majmin} 0")
        print(f"{'cap':>6} {'wants':>6} {'served':>8} {'D':>6} {'D in':<18} {'some':>6} "
              f"{'served/(1-D)':>12} {'.../(1-some)':>12}")
        for rate in (int(r) for r in a.rates.split(",") if r):
            for cap in caps:
                print(run(dev, majmin, blkio, unified, cap, rate, a.seconds), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
