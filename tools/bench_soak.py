#!/usr/bin/env python3
"""Soak: short-lived tasks churn through a running ``rswap run`` while its footprint is sampled.

Tasks are added over the control socket (``task.add`` with a command the daemon starts in its own
cgroup); each runs a fraction of a second, exits, and is reaped; names recur (``job-0`` ...
``job-<tasks-1>``) the way cron jobs and batch retries do, so profiles.db keeps one series per name.
Sampled from outside the daemon: its RSS (/proc/PID/status), open fds (/proc/PID/fd), entries of
its pinned hash maps (bpftool), and profiles.db + WAL size.  After warm-up (the first third) each
should stay flat: the table ends with the spread after warm-up.

    sudo .venv/bin/python tools/bench_soak.py --quick      # ~100 tasks, about a minute (CI)
    sudo .venv/bin/python tools/bench_soak.py              # 500 tasks
    sudo nice -n 19 .venv/bin/python tools/bench_soak.py --minutes 60 --samples 13   # an hour
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rswap_ebpf.server.control import request  # noqa: E402
from rswap_ebpf.errors import RswapError  # noqa: E402

CONFIG = """
[daemon]
interval = 0.2
checkpoint_every = 10
[resources.cpu]
total = 2000
[[task]]
name = "anchor"
priority = "batch"
command = ["sleep", "3600"]
cpu = { min = 100 }
"""
JOB = ("import time\nend = time.monotonic() + {secs}\n"
       "while time.monotonic() < end: pass")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def map_entries(pin_dir: str) -> int:
    """Entries in rswap's pinned hash maps (arrays are full by construction and left out)."""
    n = 0
    for name in sorted(os.listdir(pin_dir)) if os.path.isdir(pin_dir) else []:
        path = os.path.join(pin_dir, name)
        info = json.loads(subprocess.run(["bpftool", "-j", "map", "show", "pinned", path],
                                         capture_output=True, text=True).stdout or "{}")
        if "array" in info.get("type", ""):
            continue
        dump = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", path],
                              capture_output=True, text=True).stdout
        try:
            n += len(json.loads(dump or "[]"))
        except ValueError:
            pass
    return n


def db_kib(state: str) -> int:
    return sum(os.path.getsize(os.path.join(state, "profiles.db" + s)) for s in ("", "-wal", "-shm")
               if os.path.exists(os.path.join(state, "profiles.db" + s))) // 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100 tasks (CI)")
    ap.add_argument("--tasks", type=int, help="tasks to churn (default 500, 100 with --quick)")
    ap.add_argument("--minutes", type=float, default=0, help="keep churning at least this long")
    ap.add_argument("--concurrent", type=int, default=4, help="tasks alive at once")
    ap.add_argument("--samples", type=int, default=10, help="rows in the table")
    args = ap.parse_args(argv)
    total = args.tasks or (100 if args.quick else 500)
    if os.geteuid() != 0:
        print("bench_soak needs root (it runs rswap run)", file=sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C, so the finally below stops the daemon (it restores the host).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    tmp = tempfile.mkdtemp(prefix="rswap-soak-")
    env = {**os.environ, "RSWAP_STATE_DIR": f"{tmp}/state", "RSWAP_RUN_DIR": f"{tmp}/run",
           "RSWAP_PIN_DIR": f"/sys/fs/bpf/rswap-soak-{os.getpid()}"}
    os.environ.update({k: env[k] for k in ("RSWAP_STATE_DIR", "RSWAP_RUN_DIR", "RSWAP_PIN_DIR")})
    with open(f"{tmp}/soak.toml", "w") as f:
        f.write(CONFIG)
    # The daemon's output goes to a file: a pipe nobody reads fills up over a long soak and
    # blocks the daemon on its next warning.
    log_path = f"{tmp}/daemon.log"
    log = open(log_path, "w")
    daemon = subprocess.Popen([sys.executable, "-m", "rswap_ebpf.cli.main", "run", "--config",
                               f"{tmp}/soak.toml", "--count", "100000000"], env=env,
                              stdout=log, stderr=subprocess.STDOUT, text=True)
    rows = []
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                request("status", timeout=2)
                break
            except RswapError:
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"daemon did not start: {open(log_path).read()[-2000:]}")
                time.sleep(0.2)
        t0 = time.monotonic()
        min_end = t0 + args.minutes * 60
        every = max(1, total // args.samples)
        # a timed run samples by the clock: counting tasks would add a row every `every` tasks
        # for the whole hour
        period = args.minutes * 60 / args.samples if args.minutes else 0.0
        next_sample = t0 + period
        started = refused = 0
        i = 0
        while started < total or time.monotonic() < min_end:
            live = request("task.list", timeout=10)["tasks"]
            running = {t["name"] for t in live if t["name"].startswith("job-")}
            if len(running) >= args.concurrent:
                time.sleep(0.05)
                continue
            name = f"job-{i % total}"
            i += 1
            if name in running:
                continue
            try:
                request("task.add", timeout=10, name=name, priority="normal",
                        command=[sys.executable, "-c", JOB.format(secs=0.1 + (i % 5) * 0.05)],
                        cpu={"min": 50})
                started += 1
            except RswapError as err:
                refused += 1
                if refused > total:
                    raise SystemExit(f"task.add keeps failing: {err}")
            due = (time.monotonic() >= next_sample) if period else (started % every == 0 or started == total)
            if due:
                next_sample += period
                rows.append((time.monotonic() - t0, started, rss_kib(daemon.pid), fds(daemon.pid),
                             map_entries(env["RSWAP_PIN_DIR"]), db_kib(env["RSWAP_STATE_DIR"])))
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        log.close()
        if daemon.returncode not in (0, -15):
            print(f"daemon exited with {daemon.returncode}:\n{open(log_path).read()[-2000:]}",
                  file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'t (s)':>7} {'tasks':>6} {'RSS MiB':>8} {'fds':>5} {'map entries':>12} {'profiles.db KiB':>16}")
    for t, n, rss, fd, me, db in rows:
        print(f"{t:>7.1f} {n:>6} {rss / 1024:>8.1f} {fd:>5} {me:>12} {db:>16}")
    warm = rows[len(rows) // 3:]
    if len(warm) >= 2:
        spread = [max(r[k] for r in warm) - min(r[k] for r in warm) for k in (2, 3, 4, 5)]
        print(f"after warm-up ({len(warm)} samples): RSS spread {spread[0] / 1024:.1f} MiB, fds spread "
              f"{spread[1]}, map entries spread {spread[2]}, profiles.db spread {spread[3]} KiB; "
              f"{refused} add(s) refused")
    return 0 if daemon.returncode in (0, -15) else 1


if __name__ == "__main__":
    sys.exit(main())
