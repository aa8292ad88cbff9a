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

``--long`` records the long-season set into tests/data/long/ (see LONG below and
docs/prediction-long-seasons.md): several real programs at once, each in a shell loop aligned to
the wall clock with its own period (30 s to 30 min: 60 to 3,600 ticks at the 0.5 s tick), under one
``rswap record`` at ``--interval 0.5``, then split into one trace per periodic program (beside the
one steady task).  The host is shared with benchmarks, so every program runs at ``nice 19`` and at
low intensity (each loop sleeps between short runs: about 5-15% of one core at its peak).

``--holdout`` records into tests/data/holdout/: traces recorded after the defaults were fixed,
which ``tools/bench_forecast.py`` measures apart from the ones they were chosen on.

stress-ng and fio are Debian packages, installed with apt-get on first use.

Usage: sudo .venv/bin/python tools/record_traces.py [--seconds 150] [--only NAME] [--holdout]
       sudo .venv/bin/python tools/record_traces.py --long --seconds 4500
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
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


#: the long-season set: task -> (period in seconds, shell loop).  Every loop starts its busy
#: phase when the wall clock's seconds modulo the period pass 0 (a cron aligns to the clock too)
#: and sleeps out the rest of the period; ``$end`` stops it.  ``%(loop)s``: a loop device.
LONG = {
    # a cron job every 30 s (60 ticks): 5 s of sha256sum over 4 MB blocks
    "cron_30s": (30, "ph=$(( $(date +%s) % 30 )); if [ $ph -lt 5 ]; then "
                     "dd if=/dev/zero bs=1M count=4 2>/dev/null | sha256sum >/dev/null; sleep 0.15; "
                     "else sleep $((30 - ph)); fi"),
    # a report every 2 min (240 ticks): 20 s of gzip -6 over random blocks
    "report_2min": (120, "ph=$(( $(date +%s) % 120 )); if [ $ph -lt 20 ]; then "
                         "head -c 300000 /dev/urandom | gzip -6 >/dev/null; sleep 0.15; "
                         "else sleep $((120 - ph)); fi"),
    # a periodic flush every 5 min (600 ticks): 45 s of 4 KiB O_DIRECT writes (~100 IO/s)
    "flush_5min": (300, "ph=$(( $(date +%s) % 300 )); if [ $ph -lt 45 ]; then "
                        "dd if=/dev/zero of=%(loop)s bs=4k count=20 oflag=direct 2>/dev/null; "
                        "sleep 0.2; else sleep $((300 - ph)); fi"),
    # a compressed day of 7.5 min (900 ticks): requests (sort of 4000 shuffled lines) at a rate
    # that follows a day's shape, 15 slots of 30 s
    "web_day": (450, "ph=$(( $(date +%s) % 450 )); "
                     "k=$(echo 1 1 1 2 3 5 7 8 8 7 6 6 7 4 2 | cut -d' ' -f$((ph / 30 + 1))); "
                     "i=0; while [ $i -lt $k ]; do seq 4000 | sort -R >/dev/null; i=$((i+1)); done; "
                     "sleep 1"),
    # a phased batch every 1000 s (2000 ticks): compress (xz), then sort, then checksum, then idle
    "batch_phases": (1000, "ph=$(( $(date +%s) % 1000 )); if [ $ph -lt 150 ]; then "
                           "head -c 200000 /dev/urandom | xz -1 >/dev/null; sleep 0.25; "
                           "elif [ $ph -lt 250 ]; then seq 8000 | sort -R >/dev/null; sleep 0.2; "
                           "elif [ $ph -lt 300 ]; then dd if=/dev/zero bs=1M count=8 2>/dev/null "
                           "| sha256sum >/dev/null; sleep 0.2; else sleep $((1000 - ph)); fi"),
    # a backup every 30 min (3600 ticks): 4 min of bzip2 over random blocks
    "backup_30min": (1800, "ph=$(( $(date +%s) % 1800 )); if [ $ph -lt 240 ]; then "
                           "head -c 200000 /dev/urandom | bzip2 -1 >/dev/null; sleep 0.25; "
                           "else sleep $((1800 - ph)); fi"),
    # the steady one, in every split trace: a log compressor that never rests
    "etl_steady": (0, "head -c 100000 /dev/urandom | gzip -1 >/dev/null; sleep 0.3"),
}
LONG_INTERVAL = 0.5
LONG_STEADY = "etl_steady"


def long_config(secs: int, loop: str) -> str:
    """The TOML for the long-season set (strings as JSON, which TOML's basic strings accept)."""
    lines = ["[daemon]", f"interval = {LONG_INTERVAL}", "[resources.cpu]", "total = \"auto\"",
             "[resources.io]", "total = 1000"]
    for name, (_, body) in LONG.items():
        script = f"end=$(($(date +%s)+{secs})); while [ $(date +%s) -lt $end ]; do {body}; done"
        script = script.replace("%(loop)s", loop)
        cmd = ["nice", "-n", "19", "sh", "-c", script]
        lines += ["[[task]]", f"name = {json.dumps(name)}",
                  f"priority = {json.dumps('batch' if name == LONG_STEADY else 'critical')}",
                  f"command = {json.dumps(cmd)}"]
        if "%(loop)s" in body:
            lines.append(f"io = {{ device = {json.dumps(loop)} }}")
    return "\n".join(lines) + "\n"


def split_long(combined: str, out_dir: str) -> list[str]:
    """One trace per periodic task of ``combined`` (beside the steady task), same rows."""
    with open(combined, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    written = []
    for name, (period, _) in LONG.items():
        if not period:
            continue
        out = os.path.join(out_dir, f"{name}.csv")
        with open(out, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(header)
            w.writerows(r for r in body if r[1] in (name, LONG_STEADY))
        written.append(out)
    return written


def record_long(seconds: int, out_dir: str) -> int:
    """Record the long-season set for ``seconds`` and split it (see the module's docstring)."""
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rswap-rec-") as tmp, loop_device(tmp) as loop:
        conf = os.path.join(tmp, "rec.toml")
        with open(conf, "w") as f:
            f.write(long_config(seconds + 10, loop))
        env = dict(os.environ, RSWAP_RUN_DIR=os.path.join(tmp, "run"),
                   RSWAP_STATE_DIR=os.path.join(tmp, "state"),
                   RSWAP_PIN_DIR=f"/sys/fs/bpf/rswap-rec-{os.getpid()}")
        combined = os.path.join(out_dir, "all.csv.part")
        cmd = [sys.executable, "-m", "rswap_ebpf.cli.main", "record", "--config", conf,
               "--output", combined, "--interval", str(LONG_INTERVAL),
               "--count", str(int(seconds / LONG_INTERVAL))]
        print("recording", combined, file=sys.stderr, flush=True)
        rc = subprocess.call(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    for out in split_long(combined, out_dir):
        print("wrote", out, file=sys.stderr)
    os.unlink(combined)  # every row is in the split traces
    return rc


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
    p.add_argument("--long", action="store_true",
                   help="record the long-season set (LONG) at a 0.5 s tick into tests/data/long")
    a = p.parse_args()
    a.out_dir = a.out_dir or (os.path.join(DATA, "holdout") if a.holdout else
                              os.path.join(DATA, "long") if a.long else DATA)
    if os.geteuid() != 0:
        print("record_traces: needs root (BPF and cgroups)", file=sys.stderr)
        return 1
    if a.long:
        return record_long(a.seconds, a.out_dir)
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
