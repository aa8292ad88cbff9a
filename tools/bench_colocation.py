#!/usr/bin/env python3
"""Co-location benchmark: a latency-critical web service shares the CPUs with a CPU-bound batch
job, under these regimes, in one run (default --modes, in this order):

  alone      the service only (the latency baseline)
  static     service and batch in cgroups with fixed CPU quotas (service sized for its peak)
  weights    kernel weights only: service cpu.shares 10240, batch cpu.shares 2 (cgroup v2:
             cpu.weight 10000 / 1), what the kubelet gives a Guaranteed and a BestEffort pod
  idle       batch cpu.idle = 1 (SCHED_IDLE group), the service in a cgroup of its own
  suppress   Koordinator's CPU Suppress (cpuset policy) over the weights: every second, batch's
             cpuset = the CPUs left under 65 % of the node once the service's and the system's
             measured use are taken out (at least one CPU; at most one CPU more per round)
  reactive   rswap run, both tasks forecast with last_value
  rswap      rswap run on a config naming the two tasks, their commands and priorities
             (critical, batch) and nothing else: rswap's defaults

Load shapes (--shape): ``burst`` (every PERIOD s, BURST s at HIGH req/s, else LOW), ``steady``
(STEADY req/s throughout, about 60 % of a core here), ``ramp`` (a compressed diurnal load: LOW to
HIGH and back as a cosine over RAMP_PERIOD s).

Real programs, all on 127.0.0.1 and bounded in time (Debian packages nginx-light, wrk and
stress-ng; installed with apt-get on first use when missing, and said so):

- service: nginx (2 workers) serving a text page gzip-compressed at level 9 on every request
  (a few ms of CPU each, so a burst needs about a core);
- load: wrk driven by a Lua script (written next to the run) that sends on a timetable.  wrk
  alone is closed-loop (a stalled server is asked less, and its stall is charged to the few
  requests in flight); the script paces each connection to the timetable and measures each
  request from its *scheduled* send time, so a stall is charged to every request it delayed
  (open loop, 64 connections of capacity);
- batch: stress-ng --cpu 2 (matrixprod); a first instance runs through the warm-up and a second
  one exactly over the measured window, whose bogo-ops/s (real time) is the batch's throughput.

Measured over the last MEASURE seconds of each regime.  ``--repeat N`` runs the regimes N times,
interleaved, and reports each run and the medians; ``--json FILE`` writes
``{"medians": [{"mode", "p50_ms", "p99_ms", "batch_ops_per_s", ...}], "runs": [...]}``.

    (as root) .venv/bin/python tools/bench_colocation.py [--shape steady] [--repeat 3] [--json F]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import debian_tools  # tools/debian_tools.py, beside this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from rswap_ebpf.model.stats import quantile  # noqa: E402  (after the path above)

PACKAGES = {"nginx": "nginx-light", "wrk": "wrk", "stress-ng": "stress-ng"}

NGINX_CONF = """\
user root;
worker_processes 2;
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 512; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;
  uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
  types {{ text/plain txt; }}
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  server {{
    listen 127.0.0.1:{port};
    root {d}/www;
    gzip on; gzip_comp_level 9; gzip_min_length 0; gzip_types text/plain; gzip_http_version 1.0;
    add_header X-I $arg_i;
  }}
}}
"""

# wrk's Lua: each connection, when free, takes the next slot of the timetable (delay() returns
# the ms until its due time, 0 when late); the slot travels in the query (?i=) and nginx echoes
# it (X-I), so the response is charged from its slot's due time.  CLOCK_MONOTONIC via LuaJIT's
# ffi is the clock Python's time.monotonic() reads, so the timetable is in absolute times.
WRK_LUA = """\
local ffi = require("ffi")
ffi.cdef[[ typedef struct { long tv_sec; long tv_nsec; } rswap_ts; int clock_gettime(int, rswap_ts *); ]]
local ts = ffi.new("rswap_ts")
local function now() ffi.C.clock_gettime(1, ts) return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9 end
local due, nxt, fifo, head, tail, out = {}, 1, {}, 1, 0, nil
function init(args)
  for line in io.lines(args[1]) do due[#due + 1] = tonumber(line) end
  out = io.open(args[2], "w")
  out:setvbuf("line")
  wrk.headers["Accept-Encoding"] = "gzip"
end
function delay()
  if nxt > #due then return 3600000 end
  local i = nxt
  nxt = nxt + 1
  tail = tail + 1
  fifo[tail] = i
  local d = (due[i] - now()) * 1000
  if d > 0 then return math.floor(d) end
  return 0
end
function request()
  -- wrk also calls request() once at start-up, before any delay(): nothing is queued then
  local i = fifo[head]
  if i then
    fifo[head] = nil
    head = head + 1
  end
  return wrk.format("GET", "/page.txt?i=" .. (i or 0))
end
function response(status, headers, body)
  local i = tonumber(headers["X-I"])
  if i and i > 0 then out:write(string.format("%d %d %.6f\\n", i, status, now() - due[i])) end
end
"""

# The batch job: stress-ng through the warm-up, then (once GO exists) a fresh stress-ng timed
# over exactly the measured window, its metrics in YAML.
BATCH = """\
stress-ng --cpu 2 --cpu-method matrixprod --timeout {total}s >/dev/null 2>&1 & w=$!
while [ ! -e {go} ]; do sleep 0.05; done
kill $w; wait $w
exec stress-ng --cpu 2 --cpu-method matrixprod --timeout {measure}s --metrics-brief \
  --yaml {yaml} >/dev/null 2>&1
"""


def ensure_tools() -> None:
    debian_tools.ensure(PACKAGES, "this benchmark runs")


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


def page(path: str, size: int) -> None:
    """Text that compresses like prose (a few thousand random words): gzip -9 works for it."""
    rnd = random.Random(6)
    words = ["".join(rnd.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 9)))
             for _ in range(5000)]
    text, n = [], 0
    while n < size:
        w = rnd.choice(words)
        text.append(w)
        n += len(w) + 1
    with open(path, "w") as f:
        f.write(" ".join(text)[:size])


def rate_at(a, wall_t: float) -> float:
    """Requests/s the shape asks for at wall-clock time ``wall_t``."""
    if a.shape == "steady":
        return a.steady
    if a.shape == "ramp":
        return a.low + (a.high - a.low) * (1 - math.cos(2 * math.pi * (wall_t % a.ramp_period)
                                                        / a.ramp_period)) / 2
    return a.high if wall_t % a.period < a.burst else a.low


def busy_at(a, wall_t: float) -> bool:
    """Whether ``wall_t`` falls in the busy part of the shape (the burst/quiet split)."""
    if a.shape == "steady":
        return True
    return rate_at(a, wall_t) >= (a.high + a.low) / 2


def timetable(start: float, seconds: float, a) -> list[float]:
    """Absolute monotonic send times; the shape's phase follows the wall clock, so every regime
    (and rswap's forecasters, which see ticks) meets the same pattern."""
    wall0 = time.time() + (start - time.monotonic())
    out, t = [], 0.0
    while t < seconds:
        out.append(start + t)
        t += 1.0 / max(1e-3, rate_at(a, wall0 + t))
    return out


def load(d: str, port: int, start: float, seconds: float, a) -> tuple[list[float], list[float]]:
    """Run wrk over the timetable; (due times, latency in s or None for no reply) per slot."""
    due = timetable(start, seconds, a)
    sched, out, lua = (os.path.join(d, x) for x in ("sched.txt", "wrk.out", "load.lua"))
    with open(sched, "w") as f:
        f.writelines(f"{t:.6f}\n" for t in due)
    with open(lua, "w") as f:
        f.write(WRK_LUA)
    dur = int(start + seconds - time.monotonic()) + 3
    subprocess.run(["wrk", "-t1", f"-c{a.connections}", f"-d{dur}s", "--timeout", "5s",
                    "-s", lua, f"http://127.0.0.1:{port}/", "--", sched, out],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=dur + 30)
    lat: list[float | None] = [None] * len(due)
    with open(out) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[1] == "200":
                i = int(parts[0]) - 1
                if 0 <= i < len(lat):
                    lat[i] = float(parts[2])
    return due, lat


def pct(xs: list[float], q: float) -> float:
    """The ``q`` quantile of latencies ``xs`` (seconds) in ms: a latency a request really had."""
    return quantile(xs, q, "lower") * 1000 if xs else float("nan")


def bogo_rate(path: str, wait_s: float = 15) -> float:
    """bogo-ops/s (real time) from stress-ng's YAML (written when it finishes)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            text = ""
        for line in text.splitlines():
            if "bogo-ops-per-second-real-time:" in line:
                return float(line.split(":", 1)[1])
        time.sleep(0.2)
    return float("nan")


def rswap_config(path: str, mode: str, tag: str, svc_cmd: list[str], batch_cmd: list[str], a) -> None:
    """``rswap``: the two tasks, their commands and priorities, nothing else (rswap's defaults).
    ``reactive``: the same with both forecast by last_value.  --rswap-option lines go in
    [resources.cpu] of both (experiments only; the reported regimes run without)."""
    q = lambda xs: "[" + ", ".join(json.dumps(x) for x in xs) + "]"  # valid TOML strings
    fc = 'forecaster = "last_value"\n' if mode == "reactive" else ""
    extra = "".join(f"{line}\n" for line in a.rswap_option)
    cpu = f"[resources.cpu]\n{extra}\n" if extra else ""
    with open(path, "w") as f:
        f.write(f"""{cpu}[[task]]
name = "{tag}-svc"
priority = "critical"
command = {q(svc_cmd)}
{fc}
[[task]]
name = "{tag}-batch"
priority = "batch"
command = {q(batch_cmd)}
{fc}""")


def start_rswap(cfg: str, d: str, tag: str, ticks: int, log: str | None = None,
                wait_s: float = 120) -> subprocess.Popen:
    """``rswap run --config CFG --count TICKS`` with its state, run and pin directories under
    ``d`` / ``tag`` (apart from any installed daemon's); returns once the first tick is done
    (the BPF programs compile after the tasks start).  Its tick table goes to ``log``."""
    env = dict(os.environ, RSWAP_STATE_DIR=os.path.join(d, "state"),
               RSWAP_RUN_DIR=os.path.join(d, "run"), RSWAP_PIN_DIR=f"/sys/fs/bpf/{tag}")
    out = open(log, "w") if log else subprocess.DEVNULL
    daemon = subprocess.Popen([sys.executable, "-m", "rswap_ebpf.cli.main", "run", "--config", cfg,
                               "--count", str(ticks)],
                              env=env, cwd=ROOT, stdout=out, stderr=subprocess.PIPE, text=True)
    status = os.path.join(d, "run", "status.json")
    deadline = time.monotonic() + wait_s
    try:
        while time.monotonic() < deadline:
            if daemon.poll() is not None:
                raise RuntimeError("rswap run failed: " + daemon.stderr.read()[-2000:])
            try:
                with open(status) as f:
                    if json.load(f).get("tick", 0) >= 1:
                        return daemon
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"rswap run: no first tick within {wait_s:g} s")
    except BaseException:
        stop_rswap(daemon)
        raise
    finally:
        if out is not subprocess.DEVNULL:
            out.close()


def stop_rswap(daemon: subprocess.Popen, wait_s: float = 30) -> None:
    """SIGTERM (rswap restores the host and stops its tasks), then SIGKILL after ``wait_s``."""
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
    try:
        daemon.wait(wait_s)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait()


def json_clean(v):
    """JSON has no NaN: a missing figure (alone's batch) is null."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: json_clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [json_clean(x) for x in v]
    return v


def make_groups(tag: str, mode: str, a, dirs: list[str]) -> dict[str, list[str]]:
    """The baseline regimes' cgroups: name -> directories to enter, after their files are
    written (v1 cpu, or cgroup v2 where cpu is enabled there; cpuacct/cpuset as needed)."""
    from rswap_ebpf.host.cgroup import detect_mounts

    m = detect_mounts()
    v2 = m.mode == "unified" or ("cpu" in m.v2_controllers() and "cpu" not in m.v1)
    cpu_root = m.unified if v2 else m.v1["cpu"]
    files: dict[str, dict[str, str]] = {"svc": {}, "batch": {}}
    if mode == "static":
        for name, mc in (("svc", a.static_service), ("batch", 2000 - a.static_service)):
            files[name] = ({"cpu.max": f"{mc * 100} 100000"} if v2
                           else {"cpu.cfs_quota_us": str(mc * 100)})
    elif mode in ("weights", "suppress"):
        files = ({"svc": {"cpu.weight": "10000"}, "batch": {"cpu.weight": "1"}} if v2 else
                 {"svc": {"cpu.shares": "10240"}, "batch": {"cpu.shares": "2"}})
    elif mode == "idle":
        files = {"svc": {}, "batch": {"cpu.idle": "1"}}
    out: dict[str, list[str]] = {}
    for name, writes in files.items():
        cg = os.path.join(cpu_root, f"{tag}-{name}")
        os.makedirs(cg, exist_ok=True)
        dirs.append(cg)
        for fname, value in writes.items():
            with open(os.path.join(cg, fname), "w") as f:
                f.write(value)
        out[name] = [cg]
        if not v2 and "cpuacct" in m.v1:  # the suppress loop reads each group's use here
            acct = os.path.join(m.v1["cpuacct"], f"{tag}-{name}")
            os.makedirs(acct, exist_ok=True)
            dirs.append(acct)
            out[name].append(acct)
    if mode == "suppress":
        root = m.v1.get("cpuset") if not v2 else m.unified
        cs = os.path.join(root, f"{tag}-batch-cpuset")
        os.makedirs(cs, exist_ok=True)
        dirs.append(cs)
        for fname in ("cpuset.mems", "cpuset.cpus"):
            if not v2 or fname == "cpuset.cpus":
                with open(os.path.join(root, fname if not v2 else "cpuset.cpus.effective")) as f:
                    value = f.read().strip()
                with open(os.path.join(cs, fname), "w") as f:
                    f.write(value)
        out["batch"].append(cs)
    return out


def _cpus_online() -> list[int]:
    return sorted(os.sched_getaffinity(0))


class Suppress(threading.Thread):
    """Koordinator's CPU Suppress, cpuset policy (koordlet qosmanager cpusuppress), every
    ``interval`` s: suppress(BE) = capacity * threshold - used(non-BE pods) - used(system),
    where system = node used - all pods used; BE's cpuset = ceil(suppress / 1 CPU) CPUs, at
    least one (Koordinator keeps two, which on this 2-CPU host would never suppress: see
    docs/colocation.md), grown by at most ceil(10 % of the CPUs) per round, shrunk at once."""

    def __init__(self, svc_acct: str | None, batch_acct: str | None, cpuset_dir: str,
                 threshold: float, interval: float = 1.0):
        super().__init__(daemon=True)
        self.svc, self.batch, self.cpuset = svc_acct, batch_acct, cpuset_dir
        self.threshold, self.interval = threshold, interval
        self.stop = threading.Event()
        self.cpus = _cpus_online()
        self.rounds: list[int] = []

    @staticmethod
    def _node_busy_ns() -> int:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return (sum(v[:8]) - idle) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _usage_ns(d: str | None) -> int:
        if not d:
            return 0
        with open(os.path.join(d, "cpuacct.usage")) as f:
            return int(f.read())

    def run(self) -> None:
        last = (time.monotonic_ns(), self._node_busy_ns(), self._usage_ns(self.svc),
                self._usage_ns(self.batch))
        current = len(self.cpus)
        grow = max(1, math.ceil(len(self.cpus) * 0.1))
        while not self.stop.wait(self.interval):
            now = (time.monotonic_ns(), self._node_busy_ns(), self._usage_ns(self.svc),
                   self._usage_ns(self.batch))
            dt = max(1, now[0] - last[0])
            node, svc, batch = ((now[i] - last[i]) / dt for i in (1, 2, 3))
            last = now
            system = max(0.0, node - svc - batch)
            suppress = len(self.cpus) * self.threshold - svc - system
            want = min(len(self.cpus), max(1, math.ceil(suppress - 1e-9)))
            if want > current:
                want = min(want, current + grow)
            current = want
            self.rounds.append(want)
            with open(os.path.join(self.cpuset, "cpuset.cpus"), "w") as f:
                f.write(",".join(str(c) for c in self.cpus[:want]))


BASELINES = ("alone", "static", "weights", "idle", "suppress")
MODES = BASELINES + ("reactive", "rswap")


def run_regime(mode: str, a, tmp: str, rep: int) -> dict:
    from rswap_ebpf.host.journal import remove_cgroup_dir

    d = os.path.join(tmp, f"{mode}-{rep}")
    os.makedirs(os.path.join(d, "www"))
    os.makedirs(os.path.join(d, "tmp"))
    page(os.path.join(d, "www", "page.txt"), a.page_bytes)
    port = free_port()
    with open(os.path.join(d, "nginx.conf"), "w") as f:
        f.write(NGINX_CONF.format(d=d, port=port))
    tag = f"bench{os.getpid()}{mode}{rep}"
    go, yaml = os.path.join(d, "go"), os.path.join(d, "batch.yaml")
    total_s = a.seconds + 120
    svc_cmd = [shutil.which("nginx"), "-c", os.path.join(d, "nginx.conf")]
    batch_cmd = ["/bin/sh", "-c", BATCH.format(total=int(total_s), go=go, measure=int(a.measure),
                                               yaml=yaml)]
    procs: list[subprocess.Popen] = []
    dirs: list[str] = []
    daemon = None
    suppressor = None
    try:
        if mode in BASELINES:
            groups = make_groups(tag, mode, a, dirs) if mode != "alone" else {}

            def placer(cgs):
                def enter():
                    for cg in cgs:
                        with open(os.path.join(cg, "cgroup.procs"), "w") as f:
                            f.write(str(os.getpid()))
                return enter if cgs else None
            procs.append(subprocess.Popen(svc_cmd, preexec_fn=placer(groups.get("svc")),
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            if mode != "alone":
                procs.append(subprocess.Popen(batch_cmd, preexec_fn=placer(groups.get("batch")),
                                              start_new_session=True))
            if mode == "suppress":
                acct = lambda n: next((g for g in groups[n] if "/cpuacct/" in g), None)
                suppressor = Suppress(acct("svc"), acct("batch"), groups["batch"][-1],
                                      a.suppress_threshold / 100)
                suppressor.start()
        else:
            cfg = os.path.join(d, "rswap.toml")
            rswap_config(cfg, mode, tag, svc_cmd, batch_cmd, a)
            log = os.path.join(a.log_dir, f"{mode}-{rep}.log") if a.log_dir else None
            daemon = start_rswap(cfg, d, tag, int(a.seconds + 90), log)
        wait_port(port, 30)
        start = time.monotonic() + 0.5
        measure_from = start + a.seconds - a.measure
        timer = threading.Timer(max(0.0, measure_from - time.monotonic()),
                                lambda: open(go, "w").close())
        timer.start()
        try:
            due, lat = load(d, port, start, a.seconds, a)
        finally:
            timer.cancel()
        if not os.path.exists(go):
            open(go, "w").close()
        kept = [(t, x) for t, x in zip(due, lat) if t >= measure_from]
        lost = sum(1 for _, x in kept if x is None)
        worst = float("inf")  # a lost reply is worst
        got = [worst if x is None else x for _, x in kept]
        # The load's phase follows the wall clock (timetable): split busy from quiet requests.
        wall = time.time() - time.monotonic()
        burst = [worst if x is None else x for t, x in kept if busy_at(a, wall + t)]
        quiet = [worst if x is None else x for t, x in kept if not busy_at(a, wall + t)]
        if a.log_dir:
            with open(os.path.join(a.log_dir, f"{mode}-{rep}.lat"), "w") as f:
                f.writelines(f"{t - start:.3f} {'lost' if x is None else f'{x * 1000:.1f}'}\n"
                             for t, x in zip(due, lat))
        rate = bogo_rate(yaml, a.measure / 2 + 15) if mode != "alone" else float("nan")
        return {"mode": mode, "rep": rep, "p50": pct(got, 0.5), "p99": pct(got, 0.99),
                "burst_p99": pct(burst, 0.99), "quiet_p99": pct(quiet, 0.99),
                "n": len(got), "lost": lost, "batch": rate}
    finally:
        if suppressor is not None:
            suppressor.stop.set()
            suppressor.join(5)
        if daemon is not None:
            stop_rswap(daemon)
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM) if p.args is batch_cmd else p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for cg in dirs:
            for _ in range(20):
                try:
                    remove_cgroup_dir(cg)
                    break
                except OSError:
                    time.sleep(0.1)


def fmt_table(rows: list[dict], base_p99: float | None, static_batch: float | None,
              with_rep: bool) -> list[str]:
    head = "| run " if with_rep else ""
    lines = [f"{head}| regime | p50 ms | p99 ms | p99 vs alone | burst p99 | quiet p99 "
             "| batch bogo-ops/s | batch vs static |",
             ("|---" if with_rep else "") + "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        vs = f"{r['p99'] / base_p99:.2f}x" if base_p99 else "-"
        alone = r["mode"] == "alone"
        b = "-" if alone else f"{r['batch']:.0f}"
        bv = f"{r['batch'] / static_batch:.2f}x" if static_batch and not alone else "-"
        lost = f" ({r['lost']} lost)" if r.get("lost") else ""
        cell = f"| {r['rep']} " if with_rep else ""
        lines.append(f"{cell}| {r['mode']} | {r['p50']:.1f} | {r['p99']:.1f}{lost} | {vs} | "
                     f"{r['burst_p99']:.1f} | {r['quiet_p99']:.1f} | {b} | {bv} |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=("burst", "steady", "ramp"), default="burst",
                   help="the service's load over time")
    p.add_argument("--period", type=float, default=8.0, help="burst: seconds between bursts")
    p.add_argument("--burst", type=float, default=2.0, help="burst: seconds of high load per period")
    p.add_argument("--high", type=float, default=200.0, help="requests/s during a burst (ramp: peak)")
    p.add_argument("--low", type=float, default=10.0, help="requests/s between bursts (ramp: trough)")
    p.add_argument("--steady", type=float, default=300.0,
                   help="steady: requests/s throughout (about 60 %% of a core here)")
    p.add_argument("--ramp-period", type=float, default=24.0,
                   help="ramp: seconds of one compressed day (trough, peak, trough); keep "
                        "--measure a multiple of it, so every regime measures whole days")
    p.add_argument("--page-bytes", type=int, default=100000,
                   help="size of the page nginx gzips (level 9) for every request")
    p.add_argument("--connections", type=int, default=64, help="wrk connections (open-loop capacity)")
    p.add_argument("--seconds", type=float, default=40.0, help="length of each regime's load")
    p.add_argument("--measure", type=float, default=24.0, help="measured tail of each regime")
    p.add_argument("--repeat", type=int, default=1, help="runs of every regime (medians reported)")
    p.add_argument("--static-service", type=int, default=1200,
                   help="static partitioning: the service's millicores (batch gets the rest of 2000)")
    p.add_argument("--suppress-threshold", type=float, default=65.0,
                   help="suppress: Koordinator's CPUSuppressThresholdPercent")
    p.add_argument("--modes", default=",".join(MODES), help=f"regimes to run, in order ({', '.join(MODES)})")
    p.add_argument("--rswap-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra [resources.cpu] line for both rswap regimes (experiments only)")
    p.add_argument("--json", help="write the runs and the medians here")
    p.add_argument("--log-dir", help="keep each rswap regime's tick table (MODE-RUN.log) and every "
                                     "request's latency (MODE-RUN.lat) here")
    a = p.parse_args()
    if os.geteuid() != 0:
        print("needs root (cgroups, BPF)", file=sys.stderr)
        return 2
    ensure_tools()
    # Stop cleanly (daemon, nginx, stress-ng, cgroups) on SIGTERM, and on SIGINT even when
    # started in the background (where the shell left SIGINT ignored).
    def interrupted(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    if a.log_dir:
        os.makedirs(a.log_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="rswap-bench-")
    os.chmod(tmp, 0o755)
    rows = []
    modes = a.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"unknown mode(s) {', '.join(unknown)}: choose from {', '.join(MODES)}")
    try:
        for rep in range(1, a.repeat + 1):
            for mode in modes:
                r = run_regime(mode, a, tmp, rep)
                rows.append(r)
                print(f"# run {rep} {mode}: p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms "
                      f"(burst {r['burst_p99']:.1f}, quiet {r['quiet_p99']:.1f}), "
                      f"{r['n']} requests ({r['lost']} lost), batch {r['batch']:.0f} bogo-ops/s; "
                      f"load average {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        # stopped early: report the runs that completed (whole runs only, so rows compare)
        done = max((r["rep"] for r in rows), default=0)
        whole = [rep for rep in range(1, done + 1)
                 if sum(1 for r in rows if r["rep"] == rep) == len(modes)]
        rows = [r for r in rows if r["rep"] in whole]
        a.repeat = len(whole)
        print(f"# interrupted: reporting {len(whole)} complete run(s)", file=sys.stderr, flush=True)
        if not rows:
            return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shape = {"burst": f"every {a.period:g}s a {a.burst:g}s burst at {a.high:g} req/s, else {a.low:g} req/s",
             "steady": f"steady {a.steady:g} req/s",
             "ramp": f"ramp {a.low:g} to {a.high:g} req/s and back over {a.ramp_period:g}s"}[a.shape]
    print(f"load: nginx gzip -9 of {a.page_bytes} B per request; {shape} (wrk, open loop); batch "
          f"stress-ng --cpu 2; measured over the last {a.measure:g}s of {a.seconds:g}s per regime")
    print()
    if a.repeat > 1:
        for rep in range(1, a.repeat + 1):
            mine = [r for r in rows if r["rep"] == rep]
            base = next((r["p99"] for r in mine if r["mode"] == "alone"), None)
            static = next((r["batch"] for r in mine if r["mode"] == "static"), None)
            print("\n".join(fmt_table(mine, base, static, True)[0 if rep == 1 else 2:]))
        print()
        print(f"medians over {a.repeat} runs:")
        print()
    med = []
    for mode in modes:
        mine = [r for r in rows if r["mode"] == mode]
        med.append({"mode": mode, "rep": "median", "p50": statistics.median(r["p50"] for r in mine),
                    "p99": statistics.median(r["p99"] for r in mine),
                    "burst_p99": statistics.median(r["burst_p99"] for r in mine),
                    "quiet_p99": statistics.median(r["quiet_p99"] for r in mine),
                    "batch": statistics.median(r["batch"] for r in mine),
                    "lost": sum(r["lost"] for r in mine)})
    base = next((r["p99"] for r in med if r["mode"] == "alone"), None)
    static = next((r["batch"] for r in med if r["mode"] == "static"), None)
    print("\n".join(fmt_table(med, base, static, False)))
    if a.json:
        rows = json_clean(rows)
        med = json_clean(med)
        with open(a.json, "w") as f:
            json.dump({"shape": a.shape, "repeat": a.repeat, "load_average_end": os.getloadavg(),
                       "medians": [{"mode": r["mode"], "p50_ms": r["p50"], "p99_ms": r["p99"],
                                    "burst_p99_ms": r["burst_p99"], "quiet_p99_ms": r["quiet_p99"],
                                    "batch_ops_per_s": r["batch"], "lost": r["lost"]} for r in med],
                       "runs": rows}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
