#!/usr/bin/env python3
"""Benchmark the CPU slice: control-plane time per tick and BPF run time per event.

    sudo .venv/bin/python tools/bench_control_plane.py [--ticks 30] [--seconds 3]

1. Control plane: per-tick time of forecast (learn_one + forecast(window)) and allocate
   (SwapManager.proactive_allocation) for 1, 100 and 1,000 synthetic tasks, for last-value (the
   baseline) and Holt-Winters; the ratio is against last-value measured in the same run.
2. Kernel: run time per event of bpf/cpu.bpf.c on sched_switch, from bpftool's run_time_ns /
   run_cnt with kernel.bpf_stats_enabled=1 (restored afterwards), against a bare sched_switch
   counter loaded in the same run, while a context-switch storm runs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from rswap_ebpf.predict.registry import make_forecaster  # noqa: E402
from rswap_ebpf.predict.profile import TaskProfiler  # noqa: E402
from rswap_ebpf.model.resources import ResourcePool, ResourceType  # noqa: E402
from rswap_ebpf.model.limits import Limits, Priority  # noqa: E402
from rswap_ebpf.swap.manager import ManagedTask, SwapManager  # noqa: E402

CPU = ResourceType.PROCESSOR_CYCLES


def control_plane(n_tasks: int, forecaster: str, ticks: int, window: int = 5) -> tuple[float, float]:
    """Median (forecast_ms, allocate_ms) per tick."""
    rng = random.Random(n_tasks)
    pool = ResourcePool()
    pool.register_resource(CPU, 64_000)
    mgr = SwapManager(pool, headroom=0.2)
    spec = {"name": "holt_winters", "seasonality": 10} if forecaster == "holt_winters" else forecaster
    prof = TaskProfiler(lambda t, r: make_forecaster(spec, scale=64_000))
    prios = list(Priority)
    for i in range(n_tasks):
        mgr.add_task(ManagedTask(f"t{i}", prios[i % 3], {CPU: Limits(10, None)}))
    f_times, a_times = [], []
    for tick in range(ticks):
        t0 = time.perf_counter()
        forecasts = {}
        for i in range(n_tasks):
            y = 200 + 150 * math.sin(tick / 3 + i) + rng.random() * 50
            prof.update_prediction(f"t{i}", CPU, y)
            forecasts[f"t{i}"] = {CPU: prof.get_predicted_needs(f"t{i}", window)[CPU].peak}
        t1 = time.perf_counter()
        mgr.proactive_allocation(forecasts)
        t2 = time.perf_counter()
        f_times.append((t1 - t0) * 1e3)
        a_times.append((t2 - t1) * 1e3)
    f_times.sort()
    a_times.sort()
    return f_times[len(f_times) // 2], a_times[len(a_times) // 2]


BARE = """
BPF_PERCPU_ARRAY(bare_count, u64, 1);
RAW_TRACEPOINT_PROBE(sched_switch)
{
    int zero = 0;
    u64 *v = bare_count.lookup(&zero);
    if (v)
        (*v)++;
    return 0;
}
"""


def _prog_stats() -> dict[int, tuple[str, int, int]]:
    """id -> (name, run_time_ns, run_cnt) of every loaded program."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True)
    return {p["id"]: (p.get("name", ""), p.get("run_time_ns", 0), p.get("run_cnt", 0))
            for p in json.loads(out.stdout)}


def _switch_storm(seconds: float) -> None:
    """Two threads ping-ponging through a pipe: many context switches, bounded in time."""
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    stop = time.monotonic() + seconds

    def pong():
        while True:
            b = os.read(r1, 1)
            if b == b"q":
                return
            os.write(w2, b)

    t = threading.Thread(target=pong)
    t.start()
    while time.monotonic() < stop:
        os.write(w1, b"x")
        os.read(r2, 1)
    os.write(w1, b"q")
    t.join()
    for fd in (r1, w1, r2, w2):
        os.close(fd)


def bpf_cost(seconds: float) -> list[tuple[str, float, int]]:
    from bcc import BPF

    from rswap_ebpf.host.cpu.collector import CpuCollector

    stats_path = "/proc/sys/kernel/bpf_stats_enabled"
    with open(stats_path) as f:
        original = f.read().strip()
    os.environ.setdefault("RSWAP_PIN_DIR", f"/sys/fs/bpf/rswap-bench-{os.getpid()}")
    rows = []
    try:
        with open(stats_path, "w") as f:
            f.write("1")
        existing = set(_prog_stats())
        bare = BPF(text=BARE)
        bare_ids = set(_prog_stats()) - existing
        col = CpuCollector().open()
        try:
            rswap_ids = set(_prog_stats()) - existing - bare_ids
            before = _prog_stats()
            _switch_storm(seconds)
            col.drain()
            after = _prog_stats()
        finally:
            col.close()
            bare.cleanup()

        def per_event(ids, name_filter=None):
            ns = cnt = 0
            for i in ids:
                name, a_ns, a_cnt = after[i]
                if name_filter and name != name_filter:
                    continue
                ns += a_ns - before[i][1]
                cnt += a_cnt - before[i][2]
            return (ns / cnt if cnt else float("nan")), cnt

        rows.append(("bare sched_switch counter (baseline)", *per_event(bare_ids)))
        switch_name = next((after[i][0] for i in rswap_ids if after[i][0] != "rswap_cpu_flush"), "")
        rows.append(("rswap cpu.bpf.c on sched_switch", *per_event(rswap_ids, switch_name)))
        rows.append(("rswap cpu.bpf.c flush (cpu-clock)", *per_event(rswap_ids, "rswap_cpu_flush")))
    finally:
        with open(stats_path, "w") as f:
            f.write(original)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ticks", type=int, default=30)
    ap.add_argument("--seconds", type=float, default=3.0, help="length of the context-switch storm")
    ap.add_argument("--no-bpf", action="store_true", help="skip the kernel part (no root needed)")
    a = ap.parse_args()

    print("Control plane, median per tick (forecast = learn_one + forecast(5) for every task; "
          "allocate = proactive_allocation):")
    print(f"{'tasks':>6} {'forecaster':<13} {'forecast ms':>12} {'allocate ms':>12} {'total ms':>9} {'vs last_value':>14}")
    for n in (1, 100, 1000):
        base = None
        for fc in ("last_value", "holt_winters"):
            f_ms, a_ms = control_plane(n, fc, a.ticks if n < 1000 else max(10, a.ticks // 2))
            total = f_ms + a_ms
            base = base or total
            print(f"{n:>6} {fc:<13} {f_ms:>12.3f} {a_ms:>12.3f} {total:>9.3f} {total / base:>13.1f}x")
    if a.no_bpf:
        return 0
    if os.geteuid() != 0:
        print("\nBPF run time: skipped (needs root)")
        return 0
    print(f"\nBPF run time per event ({a.seconds:g} s context-switch storm, kernel.bpf_stats_enabled=1):")
    rows = bpf_cost(a.seconds)
    base = rows[0][1] if rows else None
    print(f"{'program':<38} {'ns/event':>9} {'events':>10} {'vs bare':>8}")
    for name, ns, cnt in rows:
        print(f"{name:<38} {ns:>9.0f} {cnt:>10} {ns / base:>7.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
