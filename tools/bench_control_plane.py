#!/usr/bin/env python3
"""Benchmark the control plane per tick and the sched_switch BPF programs per event.

    .venv/bin/python tools/bench_control_plane.py [--tasks 10000] [--ticks 30] [--seconds 3] [--json FILE]

Run as root, under the benchmark locks (docs/hotpath.md).

1. Control plane, one resource: per-tick forecast (learn_one + forecast(window)) and allocate
   (SwapManager.proactive_allocation) for 1, 100 and 1,000 synthetic tasks, last-value (the
   baseline) and Holt-Winters.
2. Control plane at scale: ``--tasks`` tasks x 6 resources through the daemon's tick steps --
   drain (per-cgroup counters turned into per-task use, as the drivers' measure() does),
   observed demand, forecast and allocate (the daemon's ProfileForecast and Allocate stages with
   DaemonConfig's defaults), enforce (FileApplier + Journal writing the changed allocations into
   a scratch directory tree standing in for cgroup files) -- with the process's peak RSS.
3. Kernel: run time per event from the kernel's BPF statistics (kernel.bpf_stats_enabled=1,
   restored afterwards; run_time_ns / run_cnt per program, read with bpftool) while two
   processes pinned to one CPU ping-pong through pipes: a bare sched_switch counter (the floor)
   and rswap's cpu.bpf.c, with both processes in one cgroup, then each in its own scratch
   cgroup; then the same with the run-queue collector on as the CPU driver runs it (sharing
   cpu.bpf.c's switch program: its switch half plus the wakeup programs), and once more with
   the run-queue collector loaded alone (bpf/runq.bpf.c: a second switch program).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from rswap_ebpf.predict.registry import make_forecaster  # noqa: E402
from rswap_ebpf.predict.profile import TaskProfiler  # noqa: E402
from rswap_ebpf.model.resources import ResourceId, ResourcePool, ResourceType  # noqa: E402
from rswap_ebpf.model.limits import Limits, Priority  # noqa: E402
from rswap_ebpf.swap.manager import ManagedTask, SwapManager  # noqa: E402
from rswap_ebpf.swap.policy import StabilityPolicy  # noqa: E402
from rswap_ebpf.host.cgroup import FileApplier  # noqa: E402
from rswap_ebpf.host.journal import Journal  # noqa: E402
from rswap_ebpf.runtime.config import DaemonConfig  # noqa: E402
from rswap_ebpf.runtime.gcpolicy import GcPolicy  # noqa: E402
from rswap_ebpf.runtime.pipeline import Allocate, Observation, ProfileForecast  # noqa: E402

CPU = ResourceType.PROCESSOR_CYCLES
#: The six resources of the scale run, with a typical use per task and the file an enforcer
#: would write.  Cache ways and memory bandwidth are bounded per host (64 ways, 100 %: see
#: UNIT_LIMITS), so a pool of them cannot hold 10,000 tasks' shares: two co-processor instances
#: stand in for them, with the same use per task (2 and 5 units).
SCALE_RESOURCES = {
    ResourceType.PROCESSOR_CYCLES: (200, "cpu.max"),
    ResourceId(ResourceType.SPECIALIZED_COPROC, "bench0"): (2, "coproc0"),
    ResourceId(ResourceType.SPECIALIZED_COPROC, "bench1"): (5, "coproc1"),
    ResourceType.GPU_MEMORY: (1 << 28, "gpu.mem"),
    ResourceType.NETWORK_BANDWIDTH: (1 << 20, "net.rate"),
    ResourceType.STORAGE_IOPS: (100, "io.max"),
}


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


class _ScaleDriver:
    """One resource's driver over a scratch tree: measure() turns drained per-cgroup counters into
    per-task use the way CpuDriver.measure() does; apply() writes the allocation through a real
    FileApplier (read back, journalled once per file) into ``<root>/<task>/<file>``."""

    def __init__(self, r, mean: float, fname: str, root: str, applier: FileApplier):
        self.r, self.mean, self.fname, self.root, self.applier = r, mean, fname, root, applier
        self.rng = random.Random(mean)
        self.paths: dict[str, str] = {}

    def drain(self, tick: int, cgroup_ids: dict[str, int]) -> dict[int, float]:
        """A node where one task in ten swings (a sine of period ~19 ticks, +-50 %) and the
        rest hold steady within +-3 %: the deadband keeps those still, as on a real node."""
        m, rng = self.mean, self.rng
        return {cg: m * (1.0 + (0.5 * math.sin(tick / 3.0 + cg % 97) if cg % 10 == 0
                                else 0.03 * (rng.random() - 0.5)))
                for cg in cgroup_ids.values()}

    def measure(self, drained: dict[int, float], cgroup_ids: dict[str, int]) -> dict[str, float]:
        return {name: drained.get(cg, 0.0) for name, cg in cgroup_ids.items()}

    def apply(self, task: str, units: int) -> None:
        path = self.paths.get(task)
        if path is None:  # a driver knows its task's cgroup directory
            path = self.paths[task] = os.path.join(self.root, task, self.fname)
        self.applier.apply([(path, str(units))])


def control_plane_scale(n_tasks: int, ticks: int) -> dict[str, float]:
    """Median per-tick milliseconds of each step at ``n_tasks`` x 6 resources, and peak RSS.

    Forecast and allocate are the daemon's own stages (``runtime.pipeline.ProfileForecast`` and
    ``Allocate``) built with the daemon's defaults (``DaemonConfig``: window, headroom, the
    StabilityPolicy's hold, deadband and step, the critical floor), so what is timed is what a
    tick of ``rswap run`` does with these tasks."""
    dc = DaemonConfig()
    # cgroupfs lives in memory: tmpfs (/dev/shm) is the closer stand-in for it than a disk
    root = tempfile.mkdtemp(prefix="rswap-bench-tree-",
                            dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        pool = ResourcePool()
        for r, (mean, _) in SCALE_RESOURCES.items():
            pool.register_resource(r, int(mean * n_tasks * 0.9))  # a little short: shares move
        mgr = SwapManager(pool, headroom=dc.headroom)
        mgr.policy = StabilityPolicy(dc.hold_ticks, dc.deadband, dc.max_step_down)
        prof = TaskProfiler(lambda t, r: make_forecaster("last_value"), history=dc.history)
        forecast = ProfileForecast(prof, pool, {}, dc.window, dc.critical_floor,
                                   dc.critical_season)
        allocate = Allocate(mgr)
        applier = FileApplier(Journal(os.path.join(root, "journal.jsonl")))
        drivers = [_ScaleDriver(r, mean, fname, root, applier)
                   for r, (mean, fname) in SCALE_RESOURCES.items()]
        prios = list(Priority)
        cgroup_ids = {}
        priorities = {}
        for i in range(n_tasks):
            name = f"t{i}"
            mgr.add_task(ManagedTask(name, prios[i % 3], {r: Limits(1, None) for r in SCALE_RESOURCES}))
            priorities[name] = prios[i % 3].name.lower()
            os.mkdir(os.path.join(root, name))
            for d in drivers:
                with open(os.path.join(root, name, d.fname), "w") as f:
                    f.write("0")
            cgroup_ids[name] = 10_000 + i
        steps = {"drain": [], "forecast": [], "allocate": [], "enforce": [], "tick": [],
                 "changes": []}
        by_r = {d.r: d for d in drivers}
        collector = GcPolicy()  # as the daemon's loop runs it
        collector.start()
        for tick in range(ticks):
            t0 = time.perf_counter()
            usage: dict[str, dict] = {n: {} for n in cgroup_ids}
            observed: dict[str, dict] = {n: {} for n in cgroup_ids}
            for d in drivers:
                used = d.measure(d.drain(tick, cgroup_ids), cgroup_ids)
                seen = mgr.observed_demands(d.r, used)
                for name, units in used.items():
                    usage[name][d.r] = units
                    observed[name][d.r] = seen[name]
            obs = Observation(tick, {}, priorities, usage, observed)
            t1 = time.perf_counter()
            fc = forecast(obs)
            t2 = time.perf_counter()
            result = allocate(obs, fc)
            t3 = time.perf_counter()
            for ch in result.changes:
                by_r[ch.resource].apply(ch.task, ch.new)
            t4 = time.perf_counter()
            for k, v in zip(("drain", "forecast", "allocate", "enforce", "tick"),
                            (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                steps[k].append(v * 1e3)
            steps["changes"].append(len(result.changes))
            collector.after_tick(len(prof.profiles))
        out = {k: sorted(v)[len(v) // 2] for k, v in steps.items()}
        # steady state: the first ticks allocate from nothing and write every file
        out["first_tick_ms"] = steps["tick"][0]
        out["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


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


def _ids_by_function(b) -> dict[str, int]:
    """Function name -> kernel program id of what bcc loaded into ``b``."""
    out = {}
    for name, fn in getattr(b, "funcs", {}).items():
        with open(f"/proc/self/fdinfo/{fn.fd}") as f:
            for line in f:
                if line.startswith("prog_id:"):
                    out[name.decode() if isinstance(name, bytes) else name] = int(line.split()[1])
    return out


def _unified_root() -> str:
    from rswap_ebpf.host.cgroup import detect_mounts

    unified = detect_mounts().unified
    if not unified:
        raise SystemExit("no cgroup2 hierarchy: the two-cgroup storm needs one")
    return unified


def _pingpong(seconds: float, cpu: int, cgroups: tuple[str | None, str | None]) -> int:
    """Two processes pinned to ``cpu`` ping-pong a byte through two pipes for ``seconds``; each
    first moves itself into its cgroup directory (None: stays).  Returns round trips."""
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    rc, wc = os.pipe()

    def child(cg, body):
        pid = os.fork()
        if pid:
            return pid
        try:
            os.sched_setaffinity(0, {cpu})
            if cg:
                with open(os.path.join(cg, "cgroup.procs"), "w") as f:
                    f.write(str(os.getpid()))
            body()
        finally:
            os._exit(0)

    def pong():
        while os.read(r1, 1) == b"x":
            os.write(w2, b"x")

    def ping():
        n, stop = 0, time.monotonic() + seconds
        while time.monotonic() < stop:
            os.write(w1, b"x")
            os.read(r2, 1)
            n += 1
        os.write(w1, b"q")
        os.write(wc, n.to_bytes(8, "little"))

    pids = [child(cgroups[1], pong), child(cgroups[0], ping)]
    for pid in pids:
        os.waitpid(pid, 0)
    n = int.from_bytes(os.read(rc, 8), "little")
    for fd in (r1, w1, r2, w2, rc, wc):
        os.close(fd)
    return n


def bpf_cost(seconds: float) -> dict:
    from bcc import BPF

    from rswap_ebpf.host.cpu.collector import CpuCollector
    from rswap_ebpf.host.cpu.runq import RunqCollector

    stats_path = "/proc/sys/kernel/bpf_stats_enabled"
    with open(stats_path) as f:
        original = f.read().strip()
    os.environ.setdefault("RSWAP_PIN_DIR", f"/sys/fs/bpf/rswap-bench-{os.getpid()}")
    unified = _unified_root()
    groups = [os.path.join(unified, f"rswap-bench-{os.getpid()}-{c}") for c in "ab"]
    cpu = max(os.sched_getaffinity(0))
    out: dict = {}
    bare = col = runq = None
    try:
        with open(stats_path, "w") as f:
            f.write("1")
        for g in groups:
            os.mkdir(g)
        bare = BPF(text=BARE)
        col = CpuCollector().open()
        floor_id = _ids_by_function(bare)["raw_tracepoint__sched_switch"]
        switch_id = next(i for n, i in _ids_by_function(col._bpf).items() if "sched_switch" in n)

        def storm(cgroups, with_runq=()):
            before = _prog_stats()
            trips = _pingpong(seconds, cpu, cgroups)
            col.drain()
            if runq is not None:
                runq.drain()
            after = _prog_stats()

            def cost(i):
                ns = after[i][1] - before[i][1]
                cnt = after[i][2] - before[i][2]
                return ns, cnt

            f_ns, f_cnt = cost(floor_id)
            s_ns, s_cnt = cost(switch_id)
            row = {"round_trips": trips, "switches": s_cnt, "floor_ns": f_ns / f_cnt,
                   "switch_ns": s_ns / s_cnt}
            if with_runq:
                extra = sum(cost(i)[0] for i in with_runq)
                row["runq_ns"] = extra / s_cnt
                row["switch_and_wakeup_ns"] = (s_ns + extra) / s_cnt
            return row

        out["one_cgroup"] = storm((None, None))
        out["two_cgroups"] = storm(tuple(groups))
        # the run-queue collector as the CPU driver opens it: sharing cpu.bpf.c's program
        runq = RunqCollector(share=col).open()
        wakeups = [i for n, i in _ids_by_function(col._bpf).items() if "runq_wakeup" in n]
        out["runq_mode"] = runq.mode
        out["one_cgroup_runq"] = storm((None, None), wakeups)
        out["two_cgroups_runq"] = storm(tuple(groups), wakeups)
        delays = runq.drain()
        runq.close()
        # ... and alone (bpf/runq.bpf.c: its own switch program beside cpu.bpf.c's)
        runq = RunqCollector(alone=True).open()
        out["one_cgroup_runq_alone"] = storm((None, None), list(_ids_by_function(runq._bpf).values()))
        out["runq_drops"] = delays.dropped
        out["mode"] = col.mode
    finally:
        for b in (runq, col):
            if b is not None:
                b.close()
        if bare is not None:
            bare.cleanup()
        for g in groups:
            if os.path.isdir(g):
                os.rmdir(g)
        with open(stats_path, "w") as f:
            f.write(original)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ticks", type=int, default=30)
    ap.add_argument("--tasks", type=int, default=10_000, help="tasks of the 6-resource scale run")
    ap.add_argument("--scale-ticks", type=int, default=8, help="ticks of the scale run")
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each context-switch storm")
    ap.add_argument("--no-bpf", action="store_true", help="skip the kernel part (no root needed)")
    ap.add_argument("--skip-control-plane", action="store_true",
                    help="run only the kernel part (the BPF cost per event)")
    ap.add_argument("--json", metavar="FILE", help="write the headline figures here")
    a = ap.parse_args()
    summary: dict = {}
    if a.skip_control_plane:
        return report_bpf(a, summary)

    print("Control plane, one resource, median per tick (forecast = learn_one + forecast(5) for "
          "every task; allocate = proactive_allocation):")
    print(f"{'tasks':>6} {'forecaster':<13} {'forecast ms':>12} {'allocate ms':>12} {'total ms':>9} {'vs last_value':>14}")
    for n in (1, 100, 1000):
        base = None
        for fc in ("last_value", "holt_winters"):
            f_ms, a_ms = control_plane(n, fc, a.ticks if n < 1000 else max(10, a.ticks // 2))
            total = f_ms + a_ms
            base = base or total
            print(f"{n:>6} {fc:<13} {f_ms:>12.3f} {a_ms:>12.3f} {total:>9.3f} {total / base:>13.1f}x")

    sc = control_plane_scale(a.tasks, a.scale_ticks)
    print(f"\nControl plane at {a.tasks} tasks x {len(SCALE_RESOURCES)} resources (last_value, "
          f"median of {a.scale_ticks} ticks; enforce writes a scratch tree through FileApplier):")
    print(f"  drain {sc['drain']:.1f} ms, forecast {sc['forecast']:.1f} ms, allocate "
          f"{sc['allocate']:.1f} ms, enforce {sc['enforce']:.1f} ms ({sc['changes']:.0f} changes); "
          f"tick {sc['tick']:.1f} ms (first tick {sc['first_tick_ms']:.0f} ms); peak RSS "
          f"{sc['rss_mib']:.0f} MiB")
    summary.update({"tick_ms_%d_tasks" % a.tasks: round(sc["tick"], 1),
                    "rss_mib": round(sc["rss_mib"], 1), "scale": sc})

    return report_bpf(a, summary)


def report_bpf(a, summary: dict) -> int:
    """The kernel part (unless --no-bpf), then the JSON summary."""
    if not a.no_bpf and os.geteuid() != 0:
        print("\nBPF run time: skipped (needs root)")
    elif not a.no_bpf:
        res = bpf_cost(a.seconds)
        floor = res["one_cgroup"]["floor_ns"]
        print(f"\nBPF run time per sched_switch ({a.seconds:g} s storms: two processes pinned to "
              f"one CPU ping-pong through pipes; kernel.bpf_stats_enabled=1; cpu.bpf.c in "
              f"{res['mode']} mode; run-queue collector {res['runq_mode']}, then alone):")
        print(f"{'storm':<34} {'floor ns':>9} {'rswap ns':>9} {'x floor':>8} {'switches':>9}")
        rows = [("one cgroup: switch", "one_cgroup", "switch_ns"),
                ("two cgroups: switch", "two_cgroups", "switch_ns"),
                ("one cgroup: switch + wakeup", "one_cgroup_runq", "switch_and_wakeup_ns"),
                ("two cgroups: switch + wakeup", "two_cgroups_runq", "switch_and_wakeup_ns"),
                ("one cgroup: + runq.bpf.c alone", "one_cgroup_runq_alone", "switch_and_wakeup_ns")]
        for label, key, field in rows:
            r = res[key]
            print(f"{label:<34} {r['floor_ns']:>9.1f} {r[field]:>9.1f} {r[field] / floor:>7.2f}x "
                  f"{r['switches']:>9}")
        summary.update({"floor_ns": round(floor, 1),
                        "switch_one_cgroup_ns": round(res["one_cgroup"]["switch_ns"], 1),
                        "switch_two_cgroups_ns": round(res["two_cgroups"]["switch_ns"], 1),
                        "switch_and_wakeup_ns": round(res["one_cgroup_runq"]["switch_and_wakeup_ns"], 1),
                        "bpf": res})
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
