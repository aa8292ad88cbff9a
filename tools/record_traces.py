#!/usr/bin/env python3
"""Record the traces shipped under tests/data/ from real programs on this machine (needs root).

Each trace runs real workloads under ``rswap record`` (dry run: nothing is capped) for a short
while, with private run/state/pin directories so it never meets a running daemon:

* periodic_burst.csv: rswap's demo ``burst`` (2 workers, 4 s busy every 12 s) beside a 1-worker
  ``spin`` batch job: a latency-critical service with a periodic peak.
* cron_dd.csv: a cron-like shell loop running ``dd`` (copy 1.5 GB of zeros, ~2-3 s of CPU), then
  sleeping 7 s, beside a ``burst`` job with a different period (8 s, 2 s busy): two periods.
* stress_burst.csv: ``stress-ng`` matrix products on 2 CPUs for 3 s, then 7 s asleep, in a shell
  loop (a render or report job; the period drifts by stress-ng's start-up), beside a steady
  ``stress-ng --cpu-load 50`` batch job.
* fio_flush.csv (IO/s): ``fio`` 4 KiB O_DIRECT random writes at 300 IO/s for 2 s, then 6 s
  asleep (a periodic flush or checkpoint), beside a steady ``fio`` reader at 80 IO/s, both on a
  loop device made for the recording and removed after it.
* compile_cron.csv (held out: no default was tuned on it): ``gcc -O2`` of a generated 400-function C file
  (about 2 s of CPU), then 8 s asleep, in a shell loop (a periodic build), beside rswap's demo
  ``burst`` with its own period (5 s busy every 15 s).  No default was chosen on it.

``--holdout`` records into tests/data/holdout/: traces recorded after the defaults were fixed,
which ``tools/bench_forecast.py`` measures apart from the ones they were chosen on.

stress-ng and fio are Debian packages, installed with apt-get on first use.

Usage: sudo .venv/bin/python tools/record_traces.py [--seconds 150] [--only NAME] [--holdout]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile

import debian_tools  # tools/debian_tools.py, beside this script

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DATA = os.path.join(ROOT, "tests", "data")

TRACES = {
    "periodic_burst": """
[daemon]
interval = 1.0
[[task]]
name = "rec_web"
priority = "critical"
command = ["{python}", "-m", "rswap_ebpf.demo", "burst", "--period", "12", "--busy", "4", "--workers", "2", "--duty", "0.75", "--seconds", "%(secs)d"]
[[task]]
name = "rec_batch"
priority = "batch"
command = ["{python}", "-m", "rswap_ebpf.demo", "spin", "--workers", "1", "--duty", "0.6", "--seconds", "%(secs)d"]
""",
    "cron_dd": """
[daemon]
interval = 1.0
[[task]]
name = "rec_cron"
priority = "batch"
command = ["sh", "-c", "end=$(($(date +%%s)+%(secs)d)); while [ $(date +%%s) -lt $end ]; do dd if=/dev/zero of=/dev/null bs=64k count=24000 2>/dev/null; sleep 7; done"]
[[task]]
name = "rec_api"
priority = "critical"
command = ["{python}", "-m", "rswap_ebpf.demo", "burst", "--period", "8", "--busy", "2", "--workers", "1", "--duty", "0.9", "--seconds", "%(secs)d"]
""",
    "stress_burst": """
[daemon]
interval = 1.0
[[task]]
name = "rec_render"
priority = "critical"
command = ["sh", "-c", "end=$(($(date +%%s)+%(secs)d)); while [ $(date +%%s) -lt $end ]; do stress-ng --cpu 2 --cpu-method matrixprod --timeout 3s >/dev/null 2>&1; sleep 7; done"]
[[task]]
name = "rec_etl"
priority = "batch"
command = ["stress-ng", "--cpu", "1", "--cpu-load", "50", "--timeout", "%(secs)ds"]
""",
    "fio_flush": """
[daemon]
interval = 1.0
[resources.io]
total = 1000
[[task]]
name = "rec_flush"
priority = "critical"
command = ["sh", "-c", "end=$(($(date +%%s)+%(secs)d)); while [ $(date +%%s) -lt $end ]; do fio --name=flush --filename=%(loop)s --rw=randwrite --bs=4k --direct=1 --ioengine=psync --rate_iops=300 --runtime=2 --time_based >/dev/null 2>&1; sleep 6; done"]
io = { device = "%(loop)s" }
[[task]]
name = "rec_scan"
priority = "batch"
command = ["fio", "--name=scan", "--filename=%(loop)s", "--rw=randread", "--bs=4k", "--direct=1", "--ioengine=psync", "--rate_iops=80", "--runtime=%(secs)d", "--time_based", "--readonly"]
io = { device = "%(loop)s" }
""",
    "compile_cron": """
[daemon]
interval = 1.0
[[task]]
name = "rec_build"
priority = "batch"
command = ["sh", "-c", "i=0; while [ $i -lt 400 ]; do i=$((i+1)); echo \\"int f$i(int x){int s=0;for(int j=0;j<x;j++)s+=(j*$i)%%7;return s;}\\"; done > %(tmp)s/big.c; end=$(($(date +%%s)+%(secs)d)); while [ $(date +%%s) -lt $end ]; do gcc -O2 -c %(tmp)s/big.c -o %(tmp)s/big.o; sleep 8; done"]
[[task]]
name = "rec_svc"
priority = "critical"
command = ["{python}", "-m", "rswap_ebpf.demo", "burst", "--period", "15", "--busy", "5", "--workers", "1", "--duty", "0.8", "--seconds", "%(secs)d"]
""",
}
#: traces recorded only with --holdout (after the defaults were fixed)
HOLDOUT_ONLY = {"compile_cron"}
#: what each trace's workloads run: command -> Debian package
PACKAGES = {"stress_burst": {"stress-ng": "stress-ng"}, "fio_flush": {"fio": "fio"},
            "compile_cron": {"gcc": "gcc"}}


@contextlib.contextmanager
def loop_device(tmp: str, mib: int = 256):
    """A loop device over a file in ``tmp``, detached afterwards."""
    backing = os.path.join(tmp, "disk.img")
    with open(backing, "wb") as f:
        f.truncate(mib << 20)
    dev = subprocess.run(["losetup", "--find", "--show", backing], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, default=150)
    p.add_argument("--only", choices=sorted(TRACES))
    p.add_argument("--out-dir", help="default: tests/data, or tests/data/holdout with --holdout")
    p.add_argument("--holdout", action="store_true",
                   help="record the held-out set (every trace, compile_cron included) into "
                        "tests/data/holdout")
    a = p.parse_args()
    a.out_dir = a.out_dir or (os.path.join(DATA, "holdout") if a.holdout else DATA)
    if os.geteuid() != 0:
        print("record_traces: needs root (BPF and cgroups)", file=sys.stderr)
        return 1
    os.makedirs(a.out_dir, exist_ok=True)
    for name, cfg in TRACES.items():
        if (a.only and name != a.only) or (name in HOLDOUT_ONLY and not (a.holdout or a.only)):
            continue
        debian_tools.ensure(PACKAGES.get(name, {}), f"the {name} recording runs")
        with tempfile.TemporaryDirectory(prefix="rswap-rec-") as tmp, \
                (loop_device(tmp) if "%(loop)s" in cfg else contextlib.nullcontext("")) as loop:
            conf = os.path.join(tmp, "rec.toml")
            with open(conf, "w") as f:
                f.write(cfg % {"secs": a.seconds + 10, "loop": loop, "tmp": tmp})
            env = dict(os.environ, RSWAP_RUN_DIR=os.path.join(tmp, "run"),
                       RSWAP_STATE_DIR=os.path.join(tmp, "state"),
                       RSWAP_PIN_DIR=f"/sys/fs/bpf/rswap-rec-{os.getpid()}")
            out = os.path.join(a.out_dir, f"{name}.csv")
            cmd = [sys.executable, "-m", "rswap_ebpf.cli.main", "record", "--config", conf,
                   "--output", out, "--count", str(a.seconds)]
            print("recording", out, file=sys.stderr)
            rc = subprocess.call(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
            if rc:
                return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
