"""Kernel surprises under a running daemon (real cgroups, BPF, netns): it keeps running and says
what happened.

- a task's pids vanish between ticks;
- a task's cgroup is removed under rswap;
- the interface a net task is shaped on goes down, then is deleted;
- a BPF map fills up: it is bounded (max_entries), the overflow is counted by the program and
  reported by the daemon (output and ``status()["bpf_overflow"]``).
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import pytest

from rswap_ebpf.runtime import config
from rswap_ebpf.runtime.daemon import Daemon
from rswap_ebpf.host import bpf as bpfmod
from tests.kernel.helpers import BUSY, scratch_cgroup


def sh(*argv, check=True):
    return subprocess.run(list(argv), capture_output=True, text=True, check=check, timeout=30)


@pytest.fixture
def pin_dir(unique_name, monkeypatch, rswap_env):
    d = f"/sys/fs/bpf/rswap-test-{unique_name}"
    monkeypatch.setenv("RSWAP_PIN_DIR", d)
    yield d
    assert not os.path.exists(d), f"pins left behind in {d}"


def enter(dirs):
    procs = [os.path.join(d, "cgroup.procs") for d in dirs.values()]

    def f():
        for p in procs:
            with open(p, "w") as fh:
                fh.write(str(os.getpid()))
    return f


def make_daemon(text: str) -> tuple[Daemon, io.StringIO]:
    out = io.StringIO()
    return Daemon(config.parse(text), out=out), out


def ticks(d: Daemon, n: int, gap: float = 0.1) -> None:
    for _ in range(n):
        time.sleep(gap)
        d.tick()


def test_pids_vanish_and_cgroup_removed_under_the_daemon(pin_dir, unique_name):
    sleeper = subprocess.Popen(["sleep", "60"])
    with scratch_cgroup(f"sp-{unique_name}") as dirs:
        busy = subprocess.Popen(BUSY, preexec_fn=enter(dirs))
        d, out = make_daemon(f"""
[resources.cpu]
total = 2000
[[task]]
name = "pids-{unique_name}"
pids = [{sleeper.pid}]
cpu = {{ min = 100 }}
[[task]]
name = "adopted-{unique_name}"
cgroup = "sp-{unique_name}"
cpu = {{ min = 100 }}
""")
        try:
            d.start()
            ticks(d, 2)
            # The pid goes away between ticks (its cgroup is rswap's own, now empty).
            sleeper.kill()
            sleeper.wait()
            ticks(d, 2)
            assert f"pids-{unique_name}" not in d.tasks or \
                d.tasks[f"pids-{unique_name}"].exited is not None
            # The adopted cgroup is removed by someone else while rswap limits it.
            busy.kill()
            busy.wait()
            for path in dirs.values():
                os.rmdir(path)
            ticks(d, 2)
            assert f"adopted-{unique_name}" not in d.tasks
            text = out.getvalue()
            assert f"task pids-{unique_name}" in text and "no process left" in text
            assert f"task adopted-{unique_name} vanished" in text
        finally:
            d.stop()
            for p in (sleeper, busy):
                if p.poll() is None:
                    p.kill()
                    p.wait()
        assert not d.journal  # restore skipped what was gone and finished


@pytest.fixture
def netns(unique_name):
    ns = f"{unique_name}s"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "-n", ns, "link", "add", "va", "type", "veth", "peer", "name", "vb")
        for dev in ("va", "vb"):
            sh("ip", "-n", ns, "link", "set", dev, "up")
        yield ns
    finally:
        sh("ip", "netns", "del", ns, check=False)


def test_interface_down_then_deleted(pin_dir, unique_name, netns):
    d, out = make_daemon(f"""
[resources.cpu]
total = 2000
[resources.net]
total = 12500000
[[task]]
name = "n-{unique_name}"
command = ["sleep", "60"]
cpu = {{ min = 100 }}
net = {{ min = 125000, interface = "{netns}:va" }}
""")
    try:
        d.start()
        ticks(d, 2)
        assert "htb" in sh("tc", "-n", netns, "qdisc", "show", "dev", "va").stdout
        sh("ip", "-n", netns, "link", "set", "va", "down")
        ticks(d, 2)  # shaping a link that is down is not an error
        assert d.tasks[f"n-{unique_name}"].exited is None
        sh("ip", "-n", netns, "link", "del", "va")
        ticks(d, 3)  # the interface, its qdiscs and filters are gone: the CPU side goes on
        assert d.tick_no == 7
    finally:
        d.stop()
    assert not d.journal


def test_full_bpf_map_is_bounded_counted_and_reported(pin_dir, unique_name, monkeypatch):
    """A 4-entry task map on a host with more runnable tasks than that: the program counts what
    it could not store, the daemon says so and carries on."""
    real_load = bpfmod.load

    def small_maps(src, cflags):
        return real_load(src, [*cflags, "-DRSWAP_MAX_TASKS=4"])

    monkeypatch.setattr(bpfmod, "load", small_maps)
    with scratch_cgroup(f"mf-{unique_name}") as dirs:
        busy = [subprocess.Popen(BUSY, preexec_fn=enter(dirs)) for _ in range(3)]
        hop = subprocess.Popen([sys.executable, "-c", "import time\nfor _ in range(3000): "
                                "time.sleep(0.001)"])
        d, out = make_daemon(f"""
[resources.cpu]
total = 2000
[[task]]
name = "mf-{unique_name}"
cgroup = "mf-{unique_name}"
cpu = {{ min = 100 }}
""")
        try:
            d.start()
            # Processes are accounted by tgid only when watched (tasks configured by pid).
            cpu = next(drv for drv in d.drivers.values() if hasattr(getattr(drv, "collector", None), "watch"))
            cpu.collector.watch(os.getpid(), hop.pid, *(p.pid for p in busy))
            info = json.loads(sh("bpftool", "-j", "map", "show", "pinned",
                                 os.path.join(pin_dir, "rswap_task_ns")).stdout)
            assert info["max_entries"] == 4
            ticks(d, 4, gap=0.2)
            assert d.status()["bpf_overflow"]["cpu"]["task_map_full"] > 0
            assert "cpu BPF task_map_full" in out.getvalue()
            # Still measuring what fits: the cgroup map has room, so the busy cgroup is charged.
            assert d.last_report.usage[f"mf-{unique_name}"][
                next(iter(d.drivers))] > 0
        finally:
            d.stop()
            for p in busy + [hop]:
                p.kill()
                p.wait()
