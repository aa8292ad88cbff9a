"""End to end: the daemon senses, forecasts, allocates and enforces IO and network tasks."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time


from rswap_ebpf.runtime import config as configmod
from rswap_ebpf.runtime.daemon import Daemon
from rswap_ebpf.host.io.enforcer import io_writer, resolve_device
from rswap_ebpf.host.cgroup import detect_mounts
from rswap_ebpf.model.resources import ResourceType

from ..conftest import run_rswap

from .helpers import TIME_SCALE
from .test_block import loopdev  # noqa: F401  (fixture)
from .test_net import RECEIVER, netpair, sh, tc_show  # noqa: F401  (fixtures)

IO, NET = ResourceType.STORAGE_IOPS, ResourceType.NETWORK_BANDWIDTH


def test_daemon_allocates_and_enforces_io_and_net(loopdev, netpair, rswap_env, unique_name,  # noqa: F811
                                                  monkeypatch):
    iface, ns_a, ns_b = netpair
    monkeypatch.setenv("RSWAP_PIN_DIR", f"/sys/fs/bpf/rswap-test-{unique_name}")
    recv = subprocess.Popen(["ip", "netns", "exec", ns_b, sys.executable, "-c", RECEIVER, "5301",
                             "1", str(20 * TIME_SCALE), "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert recv.stdout.readline().strip() == "ready"
    sender = ("import socket,time; s=socket.create_connection(('10.77.0.2',5301)); "
              f"e=time.monotonic()+{20 * TIME_SCALE}; [s.send(b'x'*65536) for _ in iter(lambda: time.monotonic()<e, False)]")
    text = f"""
[daemon]
interval = {0.5 * TIME_SCALE}
window = 2
headroom = 0.2
[resources.io]
total = 2000
[resources.net]
total = 12500000
ingress = true
[[task]]
name = "disk-{unique_name}"
priority = "normal"
command = ["sh", "-c", "while [ $(date +%s) -lt {int(time.time() + 20 * TIME_SCALE)} ]; do dd if=/dev/zero of={loopdev} bs=4k count=100 oflag=direct 2>/dev/null; done"]
forecaster = "last_value"
io = {{ device = "{loopdev}", min = 50, max = 1500 }}
[[task]]
name = "net-{unique_name}"
priority = "normal"
command = ["ip", "netns", "exec", "{ns_a}", "{sys.executable}", "-c", "{sender}"]
forecaster = "last_value"
net = {{ interface = "{ns_a}:va", min = 125000, max = 10000000 }}
"""
    cfg = configmod.parse(text)
    d = Daemon(cfg, out=io.StringIO())
    seen = {}
    try:
        d.start()
        for _ in range(8):
            time.sleep(cfg.daemon.interval)
            rep = d.tick()
        disk, net = f"disk-{unique_name}", f"net-{unique_name}"
        seen["io_used"] = rep.usage[disk][IO]
        seen["net_used"] = rep.usage[net][NET]
        seen["io_alloc"] = d.pool.allocation(IO, disk)
        seen["net_alloc"] = d.pool.allocation(NET, net)
        cg = d.tasks[disk].cgroup
        seen["io_limit"] = io_writer(detect_mounts()).current(cg, resolve_device(loopdev)).wiops
        htb = d.drivers[NET].htb
        seen["htb"] = htb.current()[htb.classid(net)].rate_bytes_per_s
        shaper = d.drivers[NET].ingress_shaper
        seen["ifb"] = shaper.ifb.name
        seen["ifb_rate"] = shaper.current()[htb.classid(net)].rate_bytes_per_s
        seen["ingress_filter"] = tc_show(ns_a, "filter ingress")
        seen["qdisc"] = tc_show(ns_a, "qdisc")
    finally:
        d.stop()
        recv.kill()
        recv.wait(timeout=10)
    assert seen["io_used"] > 0 and seen["net_used"] > 0
    # The allocation follows use (the dd loop is unthrottled at first) and is what the kernel has.
    assert seen["io_alloc"] > 50 and seen["io_limit"] == seen["io_alloc"]
    assert seen["net_alloc"] > 125000 and seen["htb"] == seen["net_alloc"]
    assert "htb" in seen["qdisc"] and "clsact" in seen["qdisc"]
    # [resources.net] ingress = true: the same allocation caps the task's ingress on the ifb.
    assert seen["ifb_rate"] == seen["net_alloc"] and "mirred" in seen["ingress_filter"]
    assert sh("ip", "-n", ns_a, "link", "show", seen["ifb"], check=False).returncode != 0
    assert tc_show(ns_a, "filter ingress") == ""
    # Stopped: everything is put back.
    qd = tc_show(ns_a, "qdisc")
    assert "htb" not in qd and "clsact" not in qd
    assert not os.path.exists(f"/sys/fs/bpf/rswap-test-{unique_name}")
    assert not any(os.path.exists(d) for d in cg.dirs.values())


# -- bursts forecast ahead ------------------------------------------------------------------------
# Both workloads are phase-locked to the wall clock (like ``rswap_ebpf.demo burst``): busy for
# ``busy`` seconds of every ``period``, idle otherwise, and both stop after ``seconds``.
# The IO writer issues its 4 KiB O_DIRECT writes itself (a page-aligned mmap buffer): a dd per few
# writes spent its time in fork/exec, ~35 IO/s in an emulated VM, under what counts as a burst.
IO_BURST = r"""
import mmap, os, sys, time
dev, period, busy, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
blocks = os.lseek(fd, 0, os.SEEK_END) // 4096
buf = mmap.mmap(-1, 4096)
stop, n = time.monotonic() + seconds, 0
while time.monotonic() < stop:
    phase = time.time() % period
    if phase < busy:
        os.pwrite(fd, buf, (n % blocks) * 4096)
        n += 1
    else:
        time.sleep(min(period - phase, max(0.0, stop - time.monotonic())))
os.close(fd)
"""
NET_BURST = r"""
import socket, sys, time
host, port, period, busy, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
# A small send buffer (autotuning off): what the sender queued during the burst drains within
# milliseconds at the cap, so the burst does not run on into the quiet ticks (a 4 MiB buffer
# at 20 MB/s spilled ~3.4 MB into the next tick and left too few quiet ticks to see the rise).
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
s.settimeout(5); s.connect((host, port)); s.settimeout(0.2)
buf = b"x" * 65536; stop = time.monotonic() + seconds
while time.monotonic() < stop:
    phase = time.time() % period
    if phase < busy:
        try:
            s.send(buf)
        except socket.timeout:
            pass
        except OSError:
            break
    else:
        time.sleep(min(period - phase, max(0.0, stop - time.monotonic())))
s.close()
"""
# Receiver in the peer namespace: drains one connection until EOF or its own deadline.
DRAIN = r"""
import socket, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", port)); srv.listen(1); srv.settimeout(seconds)
print("ready", flush=True)
c, _ = srv.accept(); c.settimeout(0.5); stop = time.monotonic() + seconds
while time.monotonic() < stop:
    try:
        if not c.recv(1 << 20):
            break
    except socket.timeout:
        pass
"""
ROW = re.compile(r"^\s*(\d+)\s+(\S+)\s+\S+\s+(io|net)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)")
_SCALE = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def units(text: str) -> float:
    """``123/s`` (IO/s) or ``1.2MB/s`` / ``500B/s`` (bytes/s) as printed by ``rswap run``."""
    m = re.fullmatch(r"([\d.]+)([kKMGT]?)(?:B/s|/s)", text)
    assert m, text
    return float(m.group(1)) * _SCALE[m.group(2)]


def raised_ahead(series: dict[int, tuple[float, float]], burst: float, low: float,
                 raised: float) -> list[int]:
    """Ticks ``t`` where the allocation went from below ``raised`` (at t-1) to at least
    ``raised`` while use stayed ``low`` (at t-1 and t), and the burst came in t+1 or t+2: the
    units arrived before they were needed, and not because the last burst left them there."""
    return [t for t, (used, alloc) in series.items()
            if t > 9 and t - 1 in series and t + 2 in series
            and used < low and series[t - 1][0] < low
            and series[t - 1][1] < raised <= alloc
            and max(series[t + 1][0], series[t + 2][0]) >= burst]


def test_run_raises_io_and_net_allocation_before_their_bursts(tmp_path, loopdev, netpair,  # noqa: F811
                                                              rswap_env, unique_name):
    iface, ns_a, ns_b = netpair
    # Busy 1.5 s of 4: a burst touches at most 4 of the period's 8 ticks (3 full, one split by an
    # edge), so at least 4 are quiet and a 2-tick window shows the allocation low, then raised,
    # before the next one.  Busy half the period left 3 quiet ticks when both edges split a tick,
    # and none to spare for a tick that ran long.
    period, busy, ticks, interval = 4 * TIME_SCALE, 1.5 * TIME_SCALE, 28, 0.5 * TIME_SCALE
    # The workloads outlive the run however slowly it starts (the daemon stops them at its end).
    seconds = 2 * ticks * interval + 8 * TIME_SCALE
    pin = f"/sys/fs/bpf/rswap-test-{unique_name}"
    (tmp_path / "io_burst.py").write_text(IO_BURST)
    (tmp_path / "net_burst.py").write_text(NET_BURST)
    disk, net = f"disk-{unique_name}", f"net-{unique_name}"
    cfg = tmp_path / "rswap.toml"
    cfg.write_text(f"""
[daemon]
interval = {interval}
window = 2
headroom = 0.2
hold_ticks = 0        # give back at once between bursts, so the rise before each one shows
max_step_down = 0.99
[resources.io]
total = 1000
[resources.net]
total = 25000000
[[task]]
name = "{disk}"
command = ["{sys.executable}", "{tmp_path / 'io_burst.py'}", "{loopdev}", "{period}", "{busy}", "{seconds}"]
forecaster = {{ name = "seasonal_naive", period = {int(period / interval)} }}
io = {{ device = "{loopdev}", min = 50, max = 400 }}
[[task]]
name = "{net}"
command = ["ip", "netns", "exec", "{ns_a}", "{sys.executable}", "{tmp_path / 'net_burst.py'}",
           "10.77.0.2", "5302", "{period}", "{busy}", "{seconds}"]
forecaster = {{ name = "seasonal_naive", period = {int(period / interval)} }}
net = {{ interface = "{ns_a}:va", min = 50000, max = 20000000 }}
""")
    recv = subprocess.Popen(["ip", "netns", "exec", ns_b, sys.executable, "-c", DRAIN, "5302",
                             str(seconds + 5)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert recv.stdout.readline().strip() == "ready"
        out = run_rswap("run", "--config", str(cfg), "--count", str(ticks),
                        env={**rswap_env, "RSWAP_PIN_DIR": pin}, timeout=120 * TIME_SCALE)
    finally:
        recv.kill()
        recv.wait(timeout=10)
    assert out.returncode == 0, out.stderr + out.stdout
    rows = [m.groups() for m in map(ROW.match, out.stdout.splitlines()) if m]
    series = {r: {int(t): (units(u), units(a)) for t, name, res, u, _, a, _ in rows
                  if (name, res) == (task, r)} for task, r in ((disk, "io"), (net, "net"))}
    assert len(series["io"]) == len(series["net"]) == ticks, out.stdout
    assert raised_ahead(series["io"], burst=100, low=30, raised=100), out.stdout
    assert raised_ahead(series["net"], burst=1e6, low=100e3, raised=1e6), out.stdout
    assert "host restored" in out.stdout
    assert "htb" not in tc_show(ns_a, "qdisc") and "clsact" not in tc_show(ns_a, "qdisc")
    assert not os.path.exists(pin)
