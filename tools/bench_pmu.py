#!/usr/bin/env python3
"""Per-event cost of the sched_switch cache-miss program, with and without the counter read.

Every variant is bpf/pmu.bpf.c (except the cpu.bpf.c reference) attached for real to
sched_switch, while two processes ping-pong over pipes (a bounded context-switch storm).  The
kernel's own accounting gives the cost: BPF_ENABLE_STATS (an fd that enables run-time stats while
it is open, so nothing global is flipped and left behind) and run_time_ns / run_cnt from the
program's /proc/self/fdinfo.  Variants run interleaved over several rounds; the table reports the
median ns per event and the ratio to the no-read baseline measured in the same run.

  no-read      the accounting only: per-CPU state, task and cgroup map updates
  replay       counters read from a BPF array (the test source)
  sw-counter   bpf_perf_event_read_value() on two software perf events (context switches and
               cpu-clock), the same helper and perf-array path a hardware counter takes; this host
               has no PMU, so hardware counters cannot be opened here
  sw/8         the same, measuring every 8th slice (RSWAP_PMU_SAMPLE=8)
  hw, hw/8     PERF_COUNT_HW_CACHE_MISSES + CACHE_REFERENCES, only where the CPU has a PMU

  sudo .venv/bin/python tools/bench_pmu.py [--rounds 3] [--switches 20000]
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from rswap_ebpf.sense import bpf as bpfmod  # noqa: E402
from rswap_ebpf.host.cache.pmu import SOFTWARE_COUNTERS, PmuCollector, pmu_available  # noqa: E402

_NR_BPF = {"x86_64": 321, "aarch64": 280}
BPF_ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0


def enable_stats() -> int:
    attr = (ctypes.c_uint8 * 8)()
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(_NR_BPF[os.uname().machine], BPF_ENABLE_STATS, ctypes.byref(attr), 8)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "BPF_ENABLE_STATS")
    return fd


def prog_stats(fd: int) -> tuple[int, int]:
    fields = {}
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            k, _, v = line.partition(":")
            fields[k.strip()] = v.strip()
    return int(fields.get("run_time_ns", 0)), int(fields.get("run_cnt", 0))


def storm(switches: int) -> None:
    """Two processes bounce one byte ``switches // 2`` times: each bounce blocks one of them."""
    a_r, a_w = os.pipe()
    b_r, b_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            for _ in range(switches // 2):
                os.read(a_r, 1)
                os.write(b_w, b"x")
        finally:
            os._exit(0)
    try:
        for _ in range(switches // 2):
            os.write(a_w, b"x")
            os.read(b_r, 1)
    finally:
        os.waitpid(pid, 0)
        for fd in (a_r, a_w, b_r, b_w):
            os.close(fd)


class CpuReference:
    """bpf/cpu.bpf.c's sched_switch program, for scale (the CPU slice's collector, no flush)."""

    def __init__(self):
        self.b = None

    def open(self):
        flags = ["-DRSWAP_RAW_TP"] if bpfmod.raw_tracepoint_supported() else []
        self.b = bpfmod.load("cpu.bpf.c", flags)
        return self

    def prog_fds(self):
        return [f.fd for f in self.b.funcs.values()]

    def close(self):
        self.b.cleanup()


class PmuVariant:
    def __init__(self, **kw):
        self.col = PmuCollector(pin=False, **kw)

    def open(self):
        self.col.open()
        return self

    def prog_fds(self):
        return [f.fd for f in self.col._bpf.funcs.values()]

    def close(self):
        self.col.close()


def variants():
    v = {"cpu.bpf.c (reference)": lambda: CpuReference(),
         "no-read": lambda: PmuVariant(no_read=True),
         "replay": lambda: PmuVariant(replay=True),
         "sw-counter": lambda: PmuVariant(counters=SOFTWARE_COUNTERS),
         "sw-counter/8": lambda: PmuVariant(counters=SOFTWARE_COUNTERS, sample=8)}
    if pmu_available():
        v["hw"] = lambda: PmuVariant()
        v["hw/8"] = lambda: PmuVariant(sample=8)
    return v


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--switches", type=int, default=20000)
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (loads BPF programs)", file=sys.stderr)
        return 2
    stats_fd = enable_stats()
    results: dict[str, list[float]] = {}
    events: dict[str, int] = {}
    try:
        for _ in range(a.rounds):
            for name, make in variants().items():
                v = make().open()
                try:
                    fds = v.prog_fds()
                    before = [prog_stats(fd) for fd in fds]
                    storm(a.switches)
                    after = [prog_stats(fd) for fd in fds]
                finally:
                    v.close()
                ns = sum(x[0] - y[0] for x, y in zip(after, before))
                cnt = sum(x[1] - y[1] for x, y in zip(after, before))
                if cnt:
                    results.setdefault(name, []).append(ns / cnt)
                    events[name] = events.get(name, 0) + cnt
    finally:
        os.close(stats_fd)
    base = statistics.median(results["no-read"])
    print(f"sched_switch program cost, {a.rounds} rounds x {a.switches} ping-pong switches "
          f"({'PMU present' if pmu_available() else 'no PMU on this host: software counters stand in'})")
    print(f"{'variant':<24} {'events':>9} {'ns/event':>9} {'min':>7} {'max':>7} {'vs no-read':>11}")
    for name, vals in results.items():
        med = statistics.median(vals)
        print(f"{name:<24} {events[name]:>9} {med:>9.1f} {min(vals):>7.1f} {max(vals):>7.1f} "
              f"{med / base:>10.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
