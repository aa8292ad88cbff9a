"""End to end: the daemon senses, forecasts, allocates and enforces IO and network tasks."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import time

import pytest

from rswap_ebpf import config as configmod
from rswap_ebpf.daemon import Daemon
from rswap_ebpf.enforce.blkio import io_writer, resolve_device
from rswap_ebpf.enforce.cgroup import detect_mounts
from rswap_ebpf.resources import ResourceType

from .test_block import loopdev  # noqa: F401  (fixture)
from .test_net import RECEIVER, netpair, sh, tc_show  # noqa: F401  (fixtures)

IO, NET = ResourceType.STORAGE_IOPS, ResourceType.NETWORK_BANDWIDTH


def test_daemon_allocates_and_enforces_io_and_net(loopdev, netpair, rswap_env, unique_name,  # noqa: F811
                                                  monkeypatch):
    iface, ns_a, ns_b = netpair
    monkeypatch.setenv("RSWAP_PIN_DIR", f"/sys/fs/bpf/rswap-test-{unique_name}")
    recv = subprocess.Popen(["ip", "netns", "exec", ns_b, sys.executable, "-c", RECEIVER, "5301",
                             "1", "12", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert recv.stdout.readline().strip() == "ready"
    sender = ("import socket,time; s=socket.create_connection(('10.77.0.2',5301)); "
              "e=time.monotonic()+9; [s.send(b'x'*65536) for _ in iter(lambda: time.monotonic()<e, False)]")
    text = f"""
[daemon]
interval = 0.5
window = 2
headroom = 0.2
[resources.io]
total = 2000
[resources.net]
total = 12500000
[[task]]
name = "disk-{unique_name}"
priority = "normal"
command = ["sh", "-c", "while [ $(date +%s) -lt {int(time.time()) + 12} ]; do dd if=/dev/zero of={loopdev} bs=4k count=100 oflag=direct 2>/dev/null; done"]
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
    # Stopped: everything is put back.
    qd = tc_show(ns_a, "qdisc")
    assert "htb" not in qd and "clsact" not in qd
    assert not os.path.exists(f"/sys/fs/bpf/rswap-test-{unique_name}")
    assert not os.path.exists(cg.dirs["blkio"])
