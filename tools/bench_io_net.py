#!/usr/bin/env python3
"""Cost of rswap's block and tc BPF programs, measured on this host (root).

  sudo .venv/bin/python tools/bench_io_net.py [--seconds 3] [--writes 4000]

1. Per-event run time of every program (bpftool's run_time_ns / run_cnt), with
   kernel.bpf_stats_enabled=1 for the run and its old value put back afterwards.
2. Throughput of one TCP stream over a veth pair between two namespaces made here, without and
   with the clsact programs attached, in the same run (ratio = with / without).
Everything created (loop device, namespaces, pins) is removed, even on error.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

from rswap_ebpf.host.net.tc import Iface
from rswap_ebpf.host.io.collector import BlockCollector
from rswap_ebpf.host.net.collector import NetCollector

STATS = "/proc/sys/kernel/bpf_stats_enabled"
RECEIVER = r"""
import socket, sys, time
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1]))); srv.listen(1); srv.settimeout(15)
print("ready", flush=True)
c, _ = srv.accept(); c.settimeout(5); n = 0; t0 = None
while True:
    try:
        b = c.recv(1 << 20)
    except socket.timeout:
        break
    if not b:
        break
    if t0 is None:
        t0 = time.monotonic()
    n += len(b)
print(n / (time.monotonic() - t0), flush=True)
"""
SENDER = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2]))); buf = b"x" * 65536
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    s.send(buf)
s.close()
"""


def sh(*argv, check=True):
    return subprocess.run(list(argv), capture_output=True, text=True, check=check, timeout=60)


def prog_stats(ids):
    out = []
    for i in ids:
        info = json.loads(sh("bpftool", "-j", "prog", "show", "id", str(i)).stdout)
        cnt, ns = info.get("run_cnt", 0), info.get("run_time_ns", 0)
        out.append((info.get("name", "?"), cnt, ns, ns / cnt if cnt else float("nan")))
    return out


def stream(ns_a, ns_b, seconds, port):
    recv = subprocess.Popen(["ip", "netns", "exec", ns_b, sys.executable, "-c", RECEIVER, str(port)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert recv.stdout.readline().strip() == "ready"
        sh("ip", "netns", "exec", ns_a, sys.executable, "-c", SENDER, "10.78.0.2", str(port),
           str(seconds))
        out, _ = recv.communicate(timeout=30)
        return float(out.strip().splitlines()[-1])
    finally:
        if recv.poll() is None:
            recv.kill()
        recv.wait()


def bench_block(writes):
    with tempfile.TemporaryDirectory() as tmp:
        img = os.path.join(tmp, "disk.img")
        sh("truncate", "-s", "64M", img)
        dev = sh("losetup", "--find", "--show", img).stdout.strip()
        try:
            with BlockCollector() as col:
                t0 = time.monotonic()
                sh("dd", "if=/dev/zero", f"of={dev}", "bs=4k", f"count={writes}", "oflag=direct")
                el = time.monotonic() - t0
                rows = prog_stats(col.prog_ids())
                col.drain()
            return rows, writes / el
        finally:
            sh("losetup", "-d", dev, check=False)


def bench_net(seconds, rounds):
    tag = uuid.uuid4().hex[:6]
    a, b = f"bench{tag}a", f"bench{tag}b"
    sh("ip", "netns", "add", a)
    try:
        sh("ip", "netns", "add", b)
        sh("ip", "link", "add", "va", "netns", a, "type", "veth", "peer", "name", "vb", "netns", b)
        for ns, d, addr in ((a, "va", "10.78.0.1/24"), (b, "vb", "10.78.0.2/24")):
            sh("ip", "-n", ns, "addr", "add", addr, "dev", d)
            sh("ip", "-n", ns, "link", "set", d, "up")
        # Alternate without/with so a busy shared host's drift hits both alike; report medians.
        base, with_prog, rows = [], [], []
        col = NetCollector([Iface("va", a)]).open()
        try:
            for r in range(rounds):
                with_prog.append(stream(a, b, seconds, 5400 + 2 * r))
                rows = prog_stats(col.prog_ids())
                col.close()
                base.append(stream(a, b, seconds, 5401 + 2 * r))
                if r + 1 < rounds:
                    col.open()
        finally:
            col.close()
        return rows, base, with_prog
    finally:
        sh("ip", "netns", "del", b, check=False)
        sh("ip", "netns", "del", a, check=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--writes", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=3, help="without/with pairs (medians reported)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_io_net: needs root", file=sys.stderr)
        return 2
    os.environ.setdefault("RSWAP_PIN_DIR", f"/sys/fs/bpf/rswap-bench-{os.getpid()}")
    with open(STATS) as f:
        old = f.read().strip()
    try:
        with open(STATS, "w") as f:
            f.write("1")
        brows, iops = bench_block(args.writes)
        nrows, base, with_prog = bench_net(args.seconds, args.rounds)
    finally:
        with open(STATS, "w") as f:
            f.write(old)
    print(f"{'program':<38} {'runs':>10} {'run_time_ns':>14} {'ns/event':>10}")
    for name, cnt, ns, per in brows + nrows:
        print(f"{name:<38} {cnt:>10} {ns:>14} {per:>10.1f}")
    print(f"\ndd oflag=direct 4k on loop, block programs attached: {iops:,.0f} IO/s")
    print(f"\n{'veth TCP stream':<28} {'Mbit/s':>10}")
    mb, mw = statistics.median(base), statistics.median(with_prog)
    print(f"{'without tc program':<28} {mb * 8 / 1e6:>10.0f}   rounds: " + " ".join(f"{x * 8 / 1e6:.0f}" for x in base))
    print(f"{'with tc program (in+egress)':<28} {mw * 8 / 1e6:>10.0f}   rounds: " + " ".join(f"{x * 8 / 1e6:.0f}" for x in with_prog))
    print(f"ratio with/without (medians): {mw / mb:.3f}")
    print(f"kernel.bpf_stats_enabled restored to {old}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
