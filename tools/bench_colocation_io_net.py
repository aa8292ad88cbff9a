#!/usr/bin/env python3
"""Co-location on storage and on the network: rswap against the kernel's own priority settings.

Two families, each a latency-critical task beside a batch task, under these regimes (default
--modes, interleaved per repeat):

storage: a reader (4 KiB O_DIRECT random reads at READ_RATE/s, open loop) beside a writer
  (WRITERS threads of WRITE_KIB O_DIRECT sequential writes, as fast as they go), both on one loop
  device over a file on the root disk (loop direct I/O on, so the I/O reaches the disk):

  alone      the reader only
  none       both, no control
  weights    blkio.weight 1000 / 10 (cgroup v1; cgroup v2 io.weight where io runs there): the
             BFQ weight files when the kernel has BFQ, else the legacy name, which the kernel
             then does not offer: the run says which file was written, or that none exists
  rswap      rswap run on a config naming the two tasks, their commands, priorities (critical,
             batch) and the device, and the device's IO/s capacity (the kernel cannot tell it)

network: a critical request/response flow (64-byte UDP requests at RPC_RATE/s, open loop, each
  answered by an echo server) beside a bulk TCP stream, from one network namespace to another
  over a veth pair.  The link is LINK_MBIT Mbit/s: an HTB root shapes the sending veth at that
  rate (a NIC of that speed) and each regime's qdisc sits under it:

  alone      the critical flow only, pfifo (1000 packets) under the link
  none       both flows, pfifo (1000 packets) under the link
  prio       a prio qdisc under the link, the critical flow in band 0 (u32 on its port); on a
             kernel without sch_prio, the same strict priority from two HTB classes (prio 0
             and 1, both borrowing the whole link), said in the output
  fq_codel   fq_codel under the link (not run, and said, on a kernel without it)
  rswap      rswap run on a config naming the two tasks, their commands, priorities and the
             interface, and the link's rate (what /sys/class/net/IF/speed says on a real NIC;
             a veth says 10 Gbit/s): rswap's own HTB is the root there

Latency is charged from each request's scheduled time (a stall is charged to every request it
delayed) and measured over the last MEASURE seconds of each regime; the batch task's throughput
(MiB/s written; Mbit/s received) over the same window.  Everything runs in namespaces, cgroups
and a loop device made here, removed on every exit path.

``--repeat N`` runs the regimes N times, interleaved, and reports each run and the medians;
``--json FILE`` writes ``{"storage": {"medians": [{"mode", "p50_ms", "p99_ms",
"batch_mib_per_s", ...}], "runs": [...]}, "network": {"medians": [{..., "batch_mbit_per_s"}]}}``.

    (as root) .venv/bin/python tools/bench_colocation_io_net.py [--family storage] [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import mmap
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
import uuid

from bench_colocation import json_clean, pct, start_rswap, stop_rswap  # tools/, beside this

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.abspath(__file__)

STORAGE_MODES = ("alone", "none", "weights", "rswap")
NETWORK_MODES = ("alone", "none", "prio", "fq_codel", "rswap")
BLOCK = 4096
IMAGE_MIB = 512
NET_A, NET_B = "10.79.0.1", "10.79.0.2"
RPC_PORT, BULK_PORT = 7100, 7200


# --- workers: started as ``bench_colocation_io_net.py worker KIND ...`` (by rswap or by us) ----

def wait_plan(path: str) -> dict:
    """The run's timetable, written once every task runs: start, from (measured), end."""
    while not os.path.exists(path):
        time.sleep(0.02)
    with open(path) as f:
        return json.load(f)


def write_out(path: str, data: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.rename(path + ".tmp", path)


def sleep_until(t: float) -> None:
    while True:
        d = t - time.monotonic()
        if d <= 0:
            return
        time.sleep(min(d, 0.05))


def timetable(start: float, end: float, rate: float, seed: int) -> list[float]:
    """Poisson arrivals at ``rate`` per second between ``start`` and ``end``."""
    rnd, out, t = random.Random(seed), [], start
    while True:
        t += rnd.expovariate(rate)
        if t >= end:
            return out
        out.append(t)


def worker_reader(dev: str, rate: float, plan_path: str, out: str) -> None:
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, BLOCK)
    blocks = (IMAGE_MIB // 2) * 1024 * 1024 // BLOCK  # the first half of the device
    plan = wait_plan(plan_path)
    rnd = random.Random(21)
    lat = []
    for due in timetable(plan["start"], plan["end"], rate, 6):
        sleep_until(due)
        os.preadv(fd, [buf], rnd.randrange(blocks) * BLOCK)
        if due >= plan["from"]:
            lat.append(time.monotonic() - due)
    os.close(fd)
    write_out(out, {"lat": lat})


def worker_writer(dev: str, threads: int, write_kib: int, dsync: bool, plan_path: str,
                  out: str) -> None:
    plan = wait_plan(plan_path)
    size = write_kib * 1024
    half = IMAGE_MIB // 2 * 1024 * 1024
    span = half // threads // size * size
    flags = os.O_WRONLY | os.O_DIRECT | (os.O_DSYNC if dsync else 0)
    done = [0] * threads

    def one(i: int) -> None:
        fd = os.open(dev, flags)
        buf = mmap.mmap(-1, size)
        buf.write(os.urandom(size))
        base, off = half + i * span, 0
        try:
            while True:
                now = time.monotonic()
                if now >= plan["end"]:
                    return
                n = os.pwritev(fd, [buf], base + off)
                off = (off + size) % span
                if time.monotonic() >= plan["from"] and now >= plan["from"]:
                    done[i] += n
        finally:
            os.close(fd)

    sleep_until(plan["start"])
    ts = [threading.Thread(target=one, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    write_out(out, {"bytes": sum(done), "seconds": plan["end"] - plan["from"]})


def worker_rpc_client(rate: float, plan_path: str, out: str) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((NET_B, RPC_PORT))
    plan = wait_plan(plan_path)
    lat, lost = [], 0
    for i, due in enumerate(timetable(plan["start"], plan["end"], rate, 7), 1):
        sleep_until(due)
        s.send(i.to_bytes(8, "little") + bytes(56))
        deadline = due + 1.0
        while True:
            s.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                got = int.from_bytes(s.recv(64)[:8], "little")
            except socket.timeout:
                got = None
            if got is None or got == i:
                break
        if due >= plan["from"]:
            if got is None:
                lost += 1
            else:
                lat.append(time.monotonic() - due)
    write_out(out, {"lat": lat, "lost": lost})


def worker_rpc_server() -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((NET_B, RPC_PORT))
    while True:
        data, peer = s.recvfrom(64)
        s.sendto(data, peer)


def worker_bulk_send(plan_path: str) -> None:
    plan = wait_plan(plan_path)
    sleep_until(plan["start"])
    s = socket.create_connection((NET_B, BULK_PORT), timeout=5)
    buf = bytes(65536)
    try:
        while time.monotonic() < plan["end"]:
            try:
                s.send(buf)
            except socket.timeout:
                pass
    except OSError:  # the receiver stops at the end: a reset then is the end
        pass
    s.close()


def worker_bulk_recv(plan_path: str, out: str) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((NET_B, BULK_PORT))
    srv.listen(1)
    plan = wait_plan(plan_path)
    srv.settimeout(max(1.0, plan["end"] - time.monotonic()))
    n = 0
    try:
        c, _ = srv.accept()
        c.settimeout(0.5)
        while time.monotonic() < plan["end"]:
            try:
                b = c.recv(1 << 20)
            except socket.timeout:
                continue
            if not b:
                break
            if time.monotonic() >= plan["from"]:
                n += len(b)
    except socket.timeout:
        pass
    write_out(out, {"bytes": n, "seconds": plan["end"] - plan["from"]})


def worker(argv: list[str]) -> int:
    kind, args = argv[0], argv[1:]
    if kind == "reader":
        worker_reader(args[0], float(args[1]), args[2], args[3])
    elif kind == "writer":
        worker_writer(args[0], int(args[1]), int(args[2]), args[3] == "dsync", args[4], args[5])
    elif kind == "rpc-client":
        worker_rpc_client(float(args[0]), args[1], args[2])
    elif kind == "rpc-server":
        worker_rpc_server()
    elif kind == "bulk-send":
        worker_bulk_send(args[0])
    elif kind == "bulk-recv":
        worker_bulk_recv(args[0], args[1])
    else:
        print(f"unknown worker {kind}", file=sys.stderr)
        return 2
    return 0


# --- the harness --------------------------------------------------------------------------------

def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check, timeout=60)


def me(*args: str) -> list[str]:
    return [sys.executable, HERE, "worker", *args]


class Storage:
    """A loop device (direct I/O) over a file of random data on the root disk."""

    def __init__(self, tmp: str):
        self.image = os.path.join("/var/tmp", f"rswap-bench-{os.getpid()}.img")
        self.dev = ""
        self.tmp = tmp

    def __enter__(self) -> Storage:
        with open(self.image, "wb") as f:  # real blocks: a hole or an unwritten extent is not read
            for _ in range(IMAGE_MIB):
                f.write(os.urandom(1 << 20))
            f.flush()
            os.fsync(f.fileno())
        self.dev = sh("losetup", "--find", "--show", "--direct-io=on", self.image).stdout.strip()
        return self

    def __exit__(self, *exc) -> None:
        if self.dev:
            sh("losetup", "-d", self.dev, check=False)
        try:
            os.unlink(self.image)
        except FileNotFoundError:
            pass

    @property
    def name(self) -> str:
        return os.path.basename(self.dev)

    def scheduler(self) -> str:
        with open(f"/sys/block/{self.name}/queue/scheduler") as f:
            return f.read().strip()


class Network:
    """Namespaces A (the tasks) and B (the peers), a veth pair va-vb between them."""

    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.a, self.b = f"rsb{tag}a", f"rsb{tag}b"
        self.made: list[str] = []
        self._kinds: dict[str, bool] = {}

    def __enter__(self) -> Network:
        for ns in (self.a, self.b):
            sh("ip", "netns", "add", ns)
            self.made.append(ns)
        sh("ip", "link", "add", "va", "netns", self.a, "type", "veth", "peer", "name", "vb",
           "netns", self.b)
        for ns, d, addr in ((self.a, "va", NET_A), (self.b, "vb", NET_B)):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", d)
            sh("ip", "-n", ns, "link", "set", d, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        return self

    def __exit__(self, *exc) -> None:
        for ns in reversed(self.made):  # deleting a namespace deletes its veth end and qdiscs
            sh("ip", "netns", "del", ns, check=False)

    def tc(self, *args: str) -> None:
        sh("ip", "netns", "exec", self.a, "tc", *args)

    def link(self, mode: str, rate_mbit: int) -> str:
        """The link (HTB at ``rate_mbit``) and the regime's qdisc under it on va's egress;
        returns what stands in for a qdisc this kernel lacks (or "")."""
        self.clear()
        if mode == "rswap":
            return ""
        critical = ["protocol", "ip", "prio", "1", "u32", "match", "ip", "dport", str(RPC_PORT),
                    "0xffff"]
        fallback = mode == "prio" and not self.has_qdisc("prio")
        self.tc("qdisc", "add", "dev", "va", "root", "handle", "1:", "htb",
                "default", "20" if fallback else "1")
        self.tc("class", "add", "dev", "va", "parent", "1:", "classid", "1:1", "htb",
                "rate", f"{rate_mbit}mbit", "ceil", f"{rate_mbit}mbit")
        if fallback:
            # No sch_prio: the same strict priority from HTB, two classes that both borrow the
            # link (rate 100 kbit, ceil the link), the critical one at prio 0, served first.
            for minor, prio in ((10, 0), (20, 1)):
                self.tc("class", "add", "dev", "va", "parent", "1:1", "classid", f"1:{minor}",
                        "htb", "rate", "100kbit", "ceil", f"{rate_mbit}mbit", "prio", str(prio))
                self.tc("qdisc", "add", "dev", "va", "parent", f"1:{minor}", "pfifo", "limit",
                        "1000")
            self.tc("filter", "add", "dev", "va", "parent", "1:", *critical, "flowid", "1:10")
            return "no sch_prio in this kernel: HTB strict priority (classes at prio 0 / 1) instead"
        leaf = {"alone": ["pfifo", "limit", "1000"], "none": ["pfifo", "limit", "1000"],
                "prio": ["prio"], "fq_codel": ["fq_codel"]}[mode]
        self.tc("qdisc", "add", "dev", "va", "parent", "1:1", "handle", "10:", *leaf)
        if mode == "prio":
            self.tc("filter", "add", "dev", "va", "parent", "10:", *critical, "flowid", "10:1")
        return ""

    def has_qdisc(self, kind: str) -> bool:
        """Whether the kernel offers ``kind`` (tried on the loopback of namespace A)."""
        if kind not in self._kinds:
            ok = subprocess.run(["ip", "netns", "exec", self.a, "tc", "qdisc", "add", "dev", "lo",
                                 "root", kind], capture_output=True).returncode == 0
            sh("ip", "netns", "exec", self.a, "tc", "qdisc", "del", "dev", "lo", "root", check=False)
            self._kinds[kind] = ok
        return self._kinds[kind]

    def clear(self) -> None:
        sh("ip", "netns", "exec", self.a, "tc", "qdisc", "del", "dev", "va", "root", check=False)

    def qdiscs(self) -> str:
        return sh("ip", "netns", "exec", self.a, "tc", "-s", "qdisc", "show", "dev", "va").stdout


def v1_or_v2_blkio():
    """(root directory, weight file names to try, version) of the hierarchy blkio runs in."""
    from rswap_ebpf.host.cgroup import detect_mounts

    m = detect_mounts()
    if "blkio" in m.v1:
        return m.v1["blkio"], ("blkio.bfq.weight", "blkio.weight"), "v1"
    if "io" in m.v2_controllers():
        return m.unified, ("io.bfq.weight", "io.weight"), "v2"
    raise SystemExit("no cgroup blkio (v1) or io (v2) controller on this host")


def weight_groups(tag: str, weighted: bool, dirs: list[str]) -> tuple[dict[str, str], str]:
    """Two blkio groups (critical, batch); with ``weighted`` their weights 1000 / 10 are written
    where a weight file exists.  Returns the groups and what was written (or why nothing was)."""
    root, names, version = v1_or_v2_blkio()
    groups, said = {}, []
    for name, weight in (("critical", 1000), ("batch", 10)):
        cg = os.path.join(root, f"{tag}-{name}")
        os.makedirs(cg, exist_ok=True)
        dirs.append(cg)
        groups[name] = cg
        if not weighted:
            continue
        for fname in names:
            path = os.path.join(cg, fname)
            if os.path.exists(path):
                with open(path, "w") as f:
                    f.write(str(weight))
                said.append(f"{version} {fname} {weight}")
                break
        else:
            said.append(f"{version} {'/'.join(names)} absent (no weight-aware scheduler)")
    return groups, "; ".join(dict.fromkeys(said))


def rswap_toml(path: str, tag: str, crit_cmd: list[str], batch_cmd: list[str], resource: str,
               target: str, total: int) -> None:
    """The two tasks, their commands, priorities and device/interface; the resource's total."""
    q = lambda xs: "[" + ", ".join(json.dumps(x) for x in xs) + "]"
    key = "device" if resource == "io" else "interface"
    with open(path, "w") as f:
        f.write(f"""[resources.{resource}]
total = {total}

[[task]]
name = "{tag}-critical"
priority = "critical"
command = {q(crit_cmd)}
{resource} = {{ {key} = "{target}" }}

[[task]]
name = "{tag}-batch"
priority = "batch"
command = {q(batch_cmd)}
{resource} = {{ {key} = "{target}" }}
""")


def writer_args(a) -> list[str]:
    return [str(a.writers), str(a.write_kib), "dsync" if a.dsync else "-"]


def wait_outputs(paths: list[str], until: float) -> None:
    while time.monotonic() < until and not all(os.path.exists(p) for p in paths):
        time.sleep(0.1)


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def remove_dirs(dirs: list[str]) -> None:
    from rswap_ebpf.host.journal import remove_cgroup_dir

    for cg in dirs:
        for _ in range(20):
            try:
                remove_cgroup_dir(cg)
                break
            except OSError:
                time.sleep(0.1)


def run_regime(family: str, mode: str, a, tmp: str, rep: int, env_obj) -> dict:
    """One regime: start the tasks (ourselves, or through rswap), hand them the timetable, read
    their results."""
    d = os.path.join(tmp, f"{family}-{mode}-{rep}")
    os.makedirs(d)
    plan, crit_out, batch_out = (os.path.join(d, x) for x in ("plan.json", "crit.json", "batch.json"))
    tag = f"rsb{os.getpid()}{family[0]}{mode.replace('_', '')}{rep}"
    procs: list[subprocess.Popen] = []
    dirs: list[str] = []
    daemon = None
    note = ""
    if family == "storage":
        dev = env_obj.dev
        crit_cmd = me("reader", dev, str(a.read_rate), plan, crit_out)
        batch_cmd = me("writer", dev, *writer_args(a), plan, batch_out)
        peer_cmds: list[list[str]] = []
    else:
        ns = ["ip", "netns", "exec"]
        crit_cmd = ns + [env_obj.a] + me("rpc-client", str(a.rpc_rate), plan, crit_out)
        batch_cmd = ns + [env_obj.a] + me("bulk-send", plan)
        peer_cmds = [ns + [env_obj.b] + me("rpc-server")]
        if mode != "alone":
            peer_cmds.append(ns + [env_obj.b] + me("bulk-recv", plan, batch_out))
    try:
        if family == "network":
            note = env_obj.link(mode, a.link_mbit)
        for cmd in peer_cmds:
            procs.append(subprocess.Popen(cmd, start_new_session=True))
        time.sleep(0.3)  # the peers bind before anyone sends
        if mode == "rswap":
            cfg = os.path.join(d, "rswap.toml")
            if family == "storage":
                rswap_toml(cfg, tag, crit_cmd, batch_cmd, "io", dev, a.io_total)
            else:
                rswap_toml(cfg, tag, crit_cmd, batch_cmd, "net", f"{env_obj.a}:va",
                           a.link_mbit * 125000)
            log = os.path.join(a.log_dir, f"{family}-{mode}-{rep}.log") if a.log_dir else None
            daemon = start_rswap(cfg, d, tag, int(a.seconds + 90), log)
        else:
            groups = {}
            if family == "storage" and mode in ("none", "weights"):
                groups, note = weight_groups(tag, mode == "weights", dirs)

            def placer(cg):
                def enter():
                    with open(os.path.join(cg, "cgroup.procs"), "w") as f:
                        f.write(str(os.getpid()))
                return enter if cg else None
            procs.append(subprocess.Popen(crit_cmd, preexec_fn=placer(groups.get("critical")),
                                          start_new_session=True))
            if mode != "alone":
                procs.append(subprocess.Popen(batch_cmd, preexec_fn=placer(groups.get("batch")),
                                              start_new_session=True))
        start = time.monotonic() + 1.0
        end = start + a.seconds
        write_out(plan, {"start": start, "from": end - a.measure, "end": end})
        outs = [crit_out] + ([batch_out] if mode != "alone" else [])
        wait_outputs(outs, end + 30)
        if family == "network" and a.log_dir:
            with open(os.path.join(a.log_dir, f"{family}-{mode}-{rep}.tc"), "w") as f:
                f.write(env_obj.qdiscs() + sh("ip", "netns", "exec", env_obj.a, "tc", "-s", "class",
                                              "show", "dev", "va").stdout)
        with open(crit_out) as f:
            crit = json.load(f)
        batch = float("nan")
        if mode != "alone":
            try:
                with open(batch_out) as f:
                    b = json.load(f)
                per_s = b["bytes"] / b["seconds"]
                batch = per_s / (1 << 20) if family == "storage" else per_s * 8 / 1e6
            except (OSError, ValueError, KeyError):
                pass
        if a.log_dir:
            with open(os.path.join(a.log_dir, f"{family}-{mode}-{rep}.lat"), "w") as f:
                f.writelines(f"{x * 1000:.3f}\n" for x in crit["lat"])
        worst = float("inf")
        lat = crit["lat"] + [worst] * crit.get("lost", 0)
        return {"family": family, "mode": mode, "rep": rep, "p50": pct(lat, 0.5),
                "p99": pct(lat, 0.99), "p999": pct(lat, 0.999), "n": len(lat),
                "lost": crit.get("lost", 0), "batch": batch, "note": note}
    finally:
        if daemon is not None:
            stop_rswap(daemon)
        stop(procs)
        remove_dirs(dirs)
        if family == "network":
            env_obj.clear()


UNITS = {"storage": ("batch MiB/s written", "batch_mib_per_s"),
         "network": ("batch Mbit/s", "batch_mbit_per_s")}


def fmt_table(family: str, rows: list[dict], with_rep: bool) -> list[str]:
    base = next((r["p99"] for r in rows if r["mode"] == "alone"), None)
    ref = next((r["batch"] for r in rows if r["mode"] == "none"), None)
    head = "| run " if with_rep else ""
    lines = [f"{head}| regime | p50 ms | p99 ms | p99.9 ms | p99 vs alone | {UNITS[family][0]} "
             "| batch vs none |",
             ("|---" if with_rep else "") + "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        alone = r["mode"] == "alone"
        vs = f"{r['p99'] / base:.2f}x" if base else "-"
        b = "-" if alone else f"{r['batch']:.1f}"
        bv = f"{r['batch'] / ref:.2f}x" if ref and not alone else "-"
        lost = f" ({r['lost']} lost)" if r.get("lost") else ""
        cell = f"| {r['rep']} " if with_rep else ""
        lines.append(f"{cell}| {r['mode']} | {r['p50']:.2f} | {r['p99']:.2f}{lost} | "
                     f"{r['p999']:.2f} | {vs} | {b} | {bv} |")
    return lines


def medians(rows: list[dict], modes: list[str]) -> list[dict]:
    out = []
    for mode in modes:
        mine = [r for r in rows if r["mode"] == mode]
        if mine:
            out.append({"mode": mode, "rep": "median",
                        **{k: statistics.median(r[k] for r in mine)
                           for k in ("p50", "p99", "p999", "batch")},
                        "lost": sum(r["lost"] for r in mine)})
    return out


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        return worker(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="storage,network", help="storage, network or both")
    p.add_argument("--modes", help="regimes to run, in order (storage: "
                   f"{', '.join(STORAGE_MODES)}; network: {', '.join(NETWORK_MODES)})")
    p.add_argument("--seconds", type=float, default=14.0, help="length of each regime's load")
    p.add_argument("--measure", type=float, default=8.0, help="measured tail of each regime")
    p.add_argument("--repeat", type=int, default=1, help="runs of every regime (medians reported)")
    p.add_argument("--read-rate", type=float, default=500.0, help="storage: reads/s (Poisson)")
    p.add_argument("--writers", type=int, default=8, help="storage: writer threads (I/O depth)")
    p.add_argument("--write-kib", type=int, default=1024, help="storage: size of each write")
    p.add_argument("--dsync", action="store_true",
                   help="storage: the writer opens the device O_DSYNC (every write durable)")
    p.add_argument("--io-total", type=int, default=0,
                   help="storage: the device's IO/s for rswap's [resources.io] total (default: "
                        "measured here, the writer alone for 3 s)")
    p.add_argument("--rpc-rate", type=float, default=500.0, help="network: requests/s (Poisson)")
    p.add_argument("--link-mbit", type=int, default=1000, help="network: the link's rate")
    p.add_argument("--json", help="write the runs and the medians here")
    p.add_argument("--log-dir", help="keep each rswap regime's tick table here")
    a = p.parse_args()
    if os.geteuid() != 0:
        print("needs root (loop devices, namespaces, cgroups, BPF)", file=sys.stderr)
        return 2
    families = [f for f in a.family.split(",") if f]
    if any(f not in UNITS for f in families):
        p.error("--family: storage and/or network")
    wanted = a.modes.split(",") if a.modes else None
    modes = {f: [m for m in (STORAGE_MODES if f == "storage" else NETWORK_MODES)
                 if wanted is None or m in wanted] for f in families}

    def interrupted(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    if a.log_dir:
        os.makedirs(a.log_dir, exist_ok=True)
    os.environ["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    tmp = tempfile.mkdtemp(prefix="rswap-bench-ionet-")
    os.chmod(tmp, 0o755)
    result: dict[str, dict] = {}
    try:
        for family in families:
            rows: list[dict] = []
            ctx = Storage(tmp) if family == "storage" else Network()
            with ctx as env_obj:
                info = {}
                if family == "storage":
                    info["scheduler"] = env_obj.scheduler()
                    if not a.io_total:
                        a.io_total = calibrate_iops(env_obj.dev, a, tmp)
                        time.sleep(3)  # the writes' tail drains before the first regime
                    info["io_total"] = a.io_total
                    print(f"# {env_obj.dev} scheduler: {info['scheduler']}; device IO/s for "
                          f"rswap: {a.io_total}", file=sys.stderr, flush=True)
                if family == "network" and "fq_codel" in modes[family] and \
                        not env_obj.has_qdisc("fq_codel"):
                    modes[family].remove("fq_codel")
                    info["fq_codel"] = "not run: no fq_codel qdisc in this kernel"
                    print("# network: fq_codel not run: no fq_codel qdisc in this kernel",
                          file=sys.stderr, flush=True)
                try:
                    for rep in range(1, a.repeat + 1):
                        for mode in modes[family]:
                            r = run_regime(family, mode, a, tmp, rep, env_obj)
                            rows.append(r)
                            print(f"# {family} run {rep} {mode}: p50 {r['p50']:.2f} ms, p99 "
                                  f"{r['p99']:.2f} ms, {r['n']} requests ({r['lost']} lost), "
                                  f"batch {r['batch']:.1f}{'; ' + r['note'] if r['note'] else ''}"
                                  f"; load average {os.getloadavg()[0]:.1f}",
                                  file=sys.stderr, flush=True)
                finally:
                    result[family] = {"info": info, "rows": rows}
    except KeyboardInterrupt:
        print("# interrupted: reporting the runs that completed", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out: dict[str, dict] = {}
    for family, got in result.items():
        rows = got["rows"]
        if not rows:
            continue
        med = medians(rows, modes[family])
        notes = sorted({f"{r['mode']}: {r['note']}" for r in rows if r["note"]})
        if family == "storage":
            print(f"storage: {a.read_rate:g} reads/s of 4 KiB (O_DIRECT, random) beside "
                  f"{a.writers} writers of {a.write_kib} KiB (O_DIRECT{', O_DSYNC' if a.dsync else ''}, sequential) on a loop device "
                  f"(scheduler {got['info'].get('scheduler')}); rswap's io total "
                  f"{got['info'].get('io_total')} IO/s")
        else:
            print(f"network: {a.rpc_rate:g} UDP requests/s beside one bulk TCP stream over a "
                  f"{a.link_mbit} Mbit/s link (HTB) on a veth pair")
        for n in notes + [f"{k}: {v}" for k, v in got["info"].items() if k == "fq_codel"]:
            print(f"  {n}")
        print(f"measured over the last {a.measure:g}s of {a.seconds:g}s per regime")
        print()
        if a.repeat > 1:
            for rep in range(1, a.repeat + 1):
                mine = [r for r in rows if r["rep"] == rep]
                if mine:
                    print("\n".join(fmt_table(family, mine, True)[0 if rep == 1 else 2:]))
            print()
            print(f"medians over {a.repeat} runs:")
            print()
        print("\n".join(fmt_table(family, med, False)))
        print()
        key = UNITS[family][1]
        out[family] = {"info": got["info"], "notes": notes, "repeat": a.repeat,
                       "medians": [{"mode": r["mode"], "p50_ms": r["p50"], "p99_ms": r["p99"],
                                    "p999_ms": r["p999"], key: r["batch"], "lost": r["lost"]}
                                   for r in med],
                       "runs": rows}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(json_clean({**out, "load_average_end": os.getloadavg()}), f, indent=1,
                      default=str)
    return 0 if out else 130


def calibrate_iops(dev: str, a, tmp: str) -> int:
    """The device's IO/s as the block layer counts them (``/sys/block/DEV/stat``: reads and
    writes completed) under the writer alone for 3 s: rswap's pool total for io."""
    def completed() -> int:
        with open(f"/sys/block/{os.path.basename(dev)}/stat") as f:
            v = f.read().split()
        return int(v[0]) + int(v[4])

    d = tempfile.mkdtemp(dir=tmp)
    plan, out = os.path.join(d, "plan.json"), os.path.join(d, "out.json")
    p = subprocess.Popen(me("writer", dev, *writer_args(a), plan, out), start_new_session=True)
    try:
        start = time.monotonic() + 0.3
        write_out(plan, {"start": start, "from": start + 0.5, "end": start + 3.5})
        sleep_until(start + 0.5)
        n0, t0 = completed(), time.monotonic()
        sleep_until(start + 3.5)
        n1, t1 = completed(), time.monotonic()
        wait_outputs([out], start + 20)
        return max(1, int((n1 - n0) / (t1 - t0)))
    finally:
        stop([p])


if __name__ == "__main__":
    sys.exit(main())
