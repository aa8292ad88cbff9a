#!/usr/bin/env python3
"""Co-location benchmark: a latency-critical HTTP service with a periodic bursty load shares the
CPUs with a CPU-bound batch job, under four regimes, in one run:

  alone      the service only (the latency baseline)
  static     service and batch in cgroups with fixed CPU quotas (service sized for its peak)
  reactive   rswap run, both tasks forecast with last_value (follows usage one tick late)
  proactive  rswap run, the service forecast with seasonal_naive over the load's period

Service: a small Python HTTP server on 127.0.0.1 whose every request burns a fixed amount of CPU
(nginx and wrk are not on this host; everything here is loopback-only and bounded in time).
Load: open loop, requests sent on a timetable (latency measured from the scheduled send time, so a
stalled server is charged for the requests it delayed): every PERIOD seconds, BURST seconds at
HIGH requests/s, otherwise LOW requests/s.  Batch: the same spin workers in every regime, each
counting loop iterations (its throughput).  Measured over the last MEASURE seconds of each regime,
after the forecasters have seen the pattern.

    sudo .venv/bin/python tools/bench_colocation.py [--period 8] [--seconds 40] [--measure 24]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SERVICE = r"""
import sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
WORK = int(sys.argv[2])
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        x = 0
        for i in range(WORK):
            x += i * i
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
s = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
s.daemon_threads = True
s.timeout = 0.5
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    s.handle_request()
"""

BATCH = r"""
import os, sys, time, signal
out, workers, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
end = time.monotonic() + seconds
kids = []
for w in range(workers):
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
        path = f"{out}.{w}"
        n = 0
        nxt = time.monotonic() + 0.2
        while True:
            for _ in range(20000):
                n += 1
            now = time.monotonic()
            if now >= nxt:
                with open(path + ".tmp", "w") as f:
                    f.write(str(n))
                os.replace(path + ".tmp", path)
                nxt = now + 0.2
                if now > end:
                    os._exit(0)
    kids.append(pid)
signal.signal(signal.SIGTERM, lambda *a: [os.kill(k, 15) for k in kids] and sys.exit(0))
for k in kids:
    os.waitpid(k, 0)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("service did not start")


def load(port: int, seconds: float, period: float, burst: float, high: float, low: float,
         measure_from: float, senders: int = 24, trace: list | None = None) -> list[float]:
    """Open-loop requests on a timetable; latencies (s) of those scheduled after measure_from."""
    start = time.monotonic() + 0.2
    times = []
    t = 0.0
    while t < seconds:
        phase = (time.time() + (start - time.monotonic()) + t) % period
        rate = high if phase < burst else low
        times.append(t)
        t += 1.0 / rate
    lat: list[float] = []
    lock = threading.Lock()
    idx = [0]

    def sender():
        conn = None
        while True:
            with lock:
                i = idx[0]
                idx[0] += 1
            if i >= len(times):
                return
            due = start + times[i]
            d = due - time.monotonic()
            if d > 0:
                time.sleep(d)
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("GET", "/")
                conn.getresponse().read()
            except (OSError, http.client.HTTPException):
                conn = None
                continue
            if times[i] >= measure_from:
                with lock:
                    lat.append(time.monotonic() - due)
                    if trace is not None:
                        trace.append((times[i], lat[-1]))

    th = [threading.Thread(target=sender, daemon=True) for _ in range(senders)]
    for x in th:
        x.start()
    for x in th:
        x.join(seconds + 30)
    return lat


def batch_count(prefix: str, workers: int) -> int:
    n = 0
    for w in range(workers):
        try:
            with open(f"{prefix}.{w}") as f:
                n += int(f.read() or 0)
        except (OSError, ValueError):
            pass
    return n


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1)))] * 1000 if xs else float("nan")


def run_regime(mode: str, a, tmp: str) -> dict:
    from rswap_ebpf.enforce.cgroup import detect_mounts
    from rswap_ebpf.enforce.journal import remove_cgroup_dir

    port = free_port()
    tag = f"bench{os.getpid()}{mode}"
    prefix = os.path.join(tmp, f"{mode}.count")
    total_s = a.seconds + 5
    svc_cmd = [sys.executable, "-c", SERVICE, str(port), str(a.work), str(total_s)]
    batch_cmd = [sys.executable, "-c", BATCH, prefix, "2", str(total_s)]
    procs: list[subprocess.Popen] = []
    dirs: list[str] = []
    daemon = None
    env = dict(os.environ)
    try:
        if mode in ("alone", "static"):
            enter = {}
            if mode == "static":
                mounts = detect_mounts()
                cpu = mounts.v1.get("cpu")
                for name, millicores in (("svc", a.static_service), ("batch", 2000 - a.static_service)):
                    d = os.path.join(cpu, f"{tag}-{name}")
                    os.makedirs(d, exist_ok=True)
                    dirs.append(d)
                    with open(os.path.join(d, "cpu.cfs_quota_us"), "w") as f:
                        f.write(str(millicores * 100))  # period 100000 us
                    enter[name] = d
            def placer(d):
                return (lambda: open(os.path.join(d, "cgroup.procs"), "w").write(str(os.getpid()))) if d else None
            procs.append(subprocess.Popen(svc_cmd, preexec_fn=placer(enter.get("svc"))))
            if mode == "static":
                procs.append(subprocess.Popen(batch_cmd, preexec_fn=placer(enter.get("batch"))))
        else:
            fc = ('"last_value"' if mode == "reactive" else
                  f'{{ name = "seasonal_naive", period = {int(round(a.period / a.interval))} }}')
            cfg = os.path.join(tmp, f"{mode}.toml")
            q = lambda xs: "[" + ", ".join(json.dumps(x) for x in xs) + "]"  # valid TOML strings
            with open(cfg, "w") as f:
                f.write(f"""[daemon]
interval = {a.interval}
window = {a.window}
headroom = 0.3
hold_ticks = 1
critical_floor = {a.critical_floor}

[resources.cpu]
total = 2000
critical_burst = {str(a.burst_quota).lower()}
critical_weight = {a.critical_weight}
batch_idle = {str(a.batch_idle).lower()}

[[task]]
name = "{tag}-svc"
priority = "critical"
command = {q(svc_cmd)}
forecaster = {fc}
cpu = {{ min = 100 }}

[[task]]
name = "{tag}-batch"
priority = "batch"
command = {q(batch_cmd)}
forecaster = "last_value"
cpu = {{ min = 100 }}
""")
            env.update(RSWAP_STATE_DIR=os.path.join(tmp, mode, "state"),
                       RSWAP_RUN_DIR=os.path.join(tmp, mode, "run"),
                       RSWAP_PIN_DIR=f"/sys/fs/bpf/{tag}")
            daemon = subprocess.Popen([sys.executable, "-m", "rswap_ebpf.cli", "run", "--config", cfg,
                                       "--count", str(int((a.seconds + 10) / a.interval))],
                                      env=env, cwd=ROOT,
                                      stdout=open(os.path.join(a.log_dir, f"{mode}.log"), "w")
                                      if a.log_dir else subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True)
        try:
            wait_port(port, 90)  # rswap compiles its BPF program first
        except RuntimeError:
            if daemon is not None and daemon.poll() is not None:
                raise RuntimeError("rswap run failed: " + daemon.stderr.read()[-2000:]) from None
            raise
        measure_from = a.seconds - a.measure
        c0 = {}

        def mark():
            time.sleep(measure_from + 0.2)
            c0["n"] = batch_count(prefix, 2)
            c0["t"] = time.monotonic()

        marker = threading.Thread(target=mark, daemon=True)
        marker.start()
        trace: list | None = [] if a.log_dir else None
        lat = load(port, a.seconds, a.period, a.burst, a.high, a.low, measure_from, trace=trace)
        if trace:
            with open(os.path.join(a.log_dir, f"{mode}.lat"), "w") as f:
                f.writelines(f"{t:.3f} {x * 1000:.1f}\n" for t, x in sorted(trace))
        marker.join()
        n1, t1 = batch_count(prefix, 2), time.monotonic()
        rate = (n1 - c0.get("n", 0)) / max(1e-9, t1 - c0.get("t", t1)) if mode != "alone" else 0.0
        return {"mode": mode, "p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "n": len(lat),
                "batch": rate}
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for d in dirs:
            try:
                remove_cgroup_dir(d)
            except OSError:
                pass


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--period", type=float, default=8.0, help="seconds between bursts")
    p.add_argument("--burst", type=float, default=2.0, help="seconds of high load per period")
    p.add_argument("--high", type=float, default=120.0, help="requests/s during a burst")
    p.add_argument("--low", type=float, default=5.0, help="requests/s between bursts")
    p.add_argument("--work", type=int, default=20000, help="loop iterations per request")
    p.add_argument("--seconds", type=float, default=40.0, help="length of each regime")
    p.add_argument("--measure", type=float, default=24.0, help="measured tail of each regime")
    p.add_argument("--interval", type=float, default=0.5, help="rswap tick")
    p.add_argument("--static-service", type=int, default=1200,
                   help="static partitioning: the service's millicores (batch gets the rest of 2000)")
    p.add_argument("--modes", default="alone,static,reactive,proactive")
    p.add_argument("--window", type=int, default=2, help="rswap forecast window (ticks)")
    p.add_argument("--critical-floor", type=float, default=0.9,
                   help="rswap: the service keeps this quantile of a season's forecast (0: off)")
    p.add_argument("--critical-weight", type=float, default=8.0,
                   help="rswap: the service's shares per millicore, relative to others")
    p.add_argument("--no-burst", dest="burst_quota", action="store_false",
                   help="rswap: no CFS burst (cpu.cfs_burst_us) for the service")
    p.add_argument("--batch-idle", action="store_true",
                   help="rswap: the batch group runs SCHED_IDLE (cpu.idle = 1)")
    p.add_argument("--log-dir", help="keep each rswap regime's tick table here (MODE.log)")
    a = p.parse_args()
    if os.geteuid() != 0:
        print("needs root (cgroups, BPF)", file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="rswap-bench-")
    rows = []
    try:
        for mode in a.modes.split(","):
            r = run_regime(mode, a, tmp)
            rows.append(r)
            print(f"# {mode}: p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms, {r['n']} requests, "
                  f"batch {r['batch']:.0f} it/s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = next((r for r in rows if r["mode"] == "alone"), None)
    static = next((r for r in rows if r["mode"] == "static"), None)
    print(f"load: every {a.period:g}s a {a.burst:g}s burst at {a.high:g} req/s, else {a.low:g} req/s; "
          f"measured over the last {a.measure:g}s of {a.seconds:g}s per regime")
    print()
    print("| regime | p50 ms | p99 ms | p99 vs alone | batch Mit/s | batch vs static |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        vs = f"{r['p99'] / base['p99']:.2f}x" if base else "-"
        bv = (f"{r['batch'] / static['batch']:.2f}x" if static and static["batch"] and r["mode"] != "alone"
              else "-")
        b = f"{r['batch'] / 1e6:.2f}" if r["mode"] != "alone" else "-"
        print(f"| {r['mode']} | {r['p50']:.1f} | {r['p99']:.1f} | {vs} | {b} | {bv} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
