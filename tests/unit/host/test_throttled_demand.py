"""A throttled task's demand read from the kernel: use + the time its threads waited throttled.

The fake cgroup tree follows the kernel's documented ``cpu.stat`` (Documentation/scheduler/
sched-bwc.rst: v1 ``nr_periods``/``nr_throttled``/``throttled_time`` in ns; admin-guide/
cgroup-v2.rst: v2 ``nr_throttled``/``throttled_usec``).  The real kernel's reading is checked in
tests/kernel/test_cpu_kernel.py.
"""
from __future__ import annotations

import io
import math

import pytest

from rswap_ebpf.runtime import config
from rswap_ebpf.runtime.daemon import Daemon
from rswap_ebpf.host.driver import ResourceDriver
from rswap_ebpf.host.cpu.driver import CpuDriver
from rswap_ebpf.host.cgroup import CgroupMounts, TaskCgroup
from rswap_ebpf.host.cpu.writer import CgroupV1CpuWriter, CgroupV2CpuWriter, ThrottleStats
from rswap_ebpf.model.resources import ResourcePool, ResourceType
from rswap_ebpf.host.cpu.collector import CpuDelta
from rswap_ebpf.model.limits import Limits, Priority
from rswap_ebpf.swap.manager import ManagedTask, SwapManager

CPU = ResourceType.PROCESSOR_CYCLES
S = 1_000_000_000


def _manager():
    pool = ResourcePool()
    pool.register_resource(CPU, 2000)
    m = SwapManager(pool, headroom=0.0, growth=2.0)
    m.add_task(ManagedTask("a", Priority.NORMAL, {CPU: Limits()}))
    m.add_task(ManagedTask("capped", Priority.NORMAL, {CPU: Limits(0, 1200)}))
    m.proactive_allocation({"a": {CPU: 100}, "capped": {CPU: 100}})
    return m


def test_a_censored_task_is_seen_at_use_plus_what_it_waited_for():
    m = _manager()
    # held at 100, two threads waited 1.8 CPU-seconds: it wanted two CPUs, not growth x 100
    assert m.observed_demand("a", CPU, 100, censored=True, withheld=1800) == 1900
    # not throttled: what it waited for does not count (there was no cap holding it)
    assert m.observed_demand("a", CPU, 100, censored=False, withheld=1800) == 100
    # never more than the pool, or the task's own limit
    assert m.observed_demand("a", CPU, 100, censored=True, withheld=5000) == 2000
    assert m.observed_demand("capped", CPU, 100, censored=True, withheld=1800) == 1200
    # throttled at a period's very end: little held back, so little more than it used
    assert m.observed_demand("a", CPU, 100, censored=True, withheld=3) == 103
    # no reading, or a broken one: the growth rule as before
    for bad in (None, math.nan, -5.0, math.inf):
        assert m.observed_demand("a", CPU, 100, censored=True, withheld=bad) == 200


def _stat_tree(tmp_path, version: str, text: str):
    d = tmp_path / "svc"
    d.mkdir(parents=True, exist_ok=True)
    (d / "cpu.stat").write_text(text)
    key = "cpu" if version == "v1" else "unified"
    return TaskCgroup("svc", "svc", {key: str(d)}, False), d


def test_cpu_stat_gives_periods_and_throttled_time_in_both_versions(tmp_path):
    cg, _ = _stat_tree(tmp_path, "v1", "nr_periods 40\nnr_throttled 12\nthrottled_time 900000000\n"
                       "nr_bursts 0\nburst_time 0\n")
    assert CgroupV1CpuWriter().throttle_stats(cg) == ThrottleStats(12, 900_000_000)
    cg2, _ = _stat_tree(tmp_path / "v2", "v2", "usage_usec 5\nuser_usec 3\nsystem_usec 2\n"
                        "nr_periods 40\nnr_throttled 12\nthrottled_usec 900000\n")
    assert CgroupV2CpuWriter().throttle_stats(cg2) == ThrottleStats(12, 900_000_000)
    # an older kernel without the time: the count alone, the manager then grows
    cg3, d = _stat_tree(tmp_path, "v1", "nr_periods 4\nnr_throttled 1\n")
    assert CgroupV1CpuWriter().throttle_stats(cg3) == ThrottleStats(1, None)
    (d / "cpu.stat").unlink()
    assert CgroupV1CpuWriter().throttle_stats(cg3) is None


class _Collector:
    def __init__(self):
        self.next = CpuDelta(S)

    def drain(self):
        return self.next


def test_the_cpu_driver_reports_what_a_throttled_task_waited_for_over_the_tick(tmp_path):
    cg, d = _stat_tree(tmp_path, "v1", "nr_periods 0\nnr_throttled 0\nthrottled_time 0\n")
    col = _Collector()
    drv = CpuDriver(CgroupMounts("hybrid", None, {"cpu": str(tmp_path)}), applier=None,
                    collector=col)
    tasks = {"svc": cg}

    def tick(interval_ns, periods, throttled_ns):
        (d / "cpu.stat").write_text(f"nr_periods 50\nnr_throttled {periods}\n"
                                    f"throttled_time {throttled_ns}\n")
        col.next = CpuDelta(interval_ns)
        drv.measure(tasks)
        return drv.censored(tasks), drv.withheld(tasks)

    assert tick(S, 0, 0) == ({}, {})                     # the first reading is the baseline
    assert tick(S, 0, 0) == ({"svc": False}, {})         # not throttled: nothing withheld
    censored, withheld = tick(2 * S, 9, 1_800_000_000)   # a 2 s tick, 1.8 s waited
    assert censored == {"svc": True}
    assert withheld == {"svc": pytest.approx(900.0)}     # millicores over that tick
    # throttled again, the time counter unchanged: censored, with nothing measured withheld
    assert tick(S, 10, 1_800_000_000) == ({"svc": True}, {"svc": 0.0})
    # a kernel that gives the count only: censored, no reading, so the manager grows
    (d / "cpu.stat").write_text("nr_periods 60\nnr_throttled 11\n")
    drv.measure(tasks)
    assert drv.censored(tasks) == {"svc": True}
    (d / "cpu.stat").write_text("nr_periods 70\nnr_throttled 12\n")
    drv.measure(tasks)
    assert drv.censored(tasks) == {"svc": True} and drv.withheld(tasks) == {}


class _ThrottledDriver(ResourceDriver):
    """A CPU driver whose task is held at what it has and waited for ``wait`` millicores more."""

    resource = CPU

    def __init__(self, wait: float | None):
        self.wait = wait
        self.applied: list[tuple[str, int]] = []
        self.held = 0

    def total(self) -> int:
        return 2000

    def measure(self, tasks):
        return {name: float(max(self.held, 10)) for name in tasks}

    def censored(self, tasks):
        return {name: True for name in tasks}

    def withheld(self, tasks):
        return {} if self.wait is None else {name: self.wait for name in tasks}

    def apply(self, cg, units):
        self.applied.append((cg.name, units))
        self.held = units
        return []


DAEMON = """
[daemon]
interval = 1.0
window = 1
headroom = 0
hold_ticks = 0
[resources.cpu]
total = 2000
[[task]]
name = "svc"
cgroup = "svc"
forecaster = "last_value"
"""


@pytest.mark.parametrize("wait, first", [(1490.0, 1500), (None, 20)])
def test_the_daemon_allocates_what_a_throttled_task_waited_for(tmp_path, rswap_env, wait, first):
    """Daemon.tick passes the driver's reading to the manager: a task held at the quota floor
    that waited for 1.49 CPUs is given 1.5 CPUs on the next tick, where growth gives 20."""
    (tmp_path / "cgroup" / "svc").mkdir(parents=True)
    (tmp_path / "cgroup" / "svc" / "cgroup.procs").write_text("")
    drv = _ThrottledDriver(wait)
    d = Daemon(config.parse(DAEMON), drivers=[drv], mounts=CgroupMounts(
        "unified", str(tmp_path / "cgroup")), out=io.StringIO())
    d.start()
    try:
        d.tick()
    finally:
        d.stop()
    assert drv.applied[0] == ("svc", first)


def test_doctor_says_whether_the_kernel_gives_the_throttled_time(tmp_path):
    """`rswap doctor`: ok where a cpu.stat (the root's or a child's) counts the time, a fallback
    that says what happens instead where it counts periods only or nothing."""
    from rswap_ebpf.cli.doctor import check_throttled_time

    v1 = tmp_path / "cpu"
    v1.mkdir()
    mounts = CgroupMounts("hybrid", None, {"cpu": str(v1)})
    (v1 / "cpu.stat").write_text("nr_periods 0\nnr_throttled 0\nthrottled_time 0\n")
    ok = check_throttled_time(mounts, CgroupV1CpuWriter())
    assert ok.status == "ok" and "throttled_time" in ok.detail
    (v1 / "cpu.stat").write_text("nr_periods 0\nnr_throttled 0\n")
    old = check_throttled_time(mounts, CgroupV1CpuWriter())
    assert old.status == "fallback" and "not the time" in old.detail and "x2" in old.detail
    # v2: the root has no bandwidth counters, a child that has the cpu controller does
    v2 = tmp_path / "unified"
    (v2 / "svc").mkdir(parents=True)
    (v2 / "cpu.stat").write_text("usage_usec 5\nuser_usec 3\nsystem_usec 2\n")
    mounts2 = CgroupMounts("unified", str(v2))
    assert check_throttled_time(mounts2, CgroupV2CpuWriter()).status == "fallback"
    (v2 / "svc" / "cpu.stat").write_text("usage_usec 5\nnr_periods 1\nnr_throttled 0\n"
                                         "throttled_usec 0\n")
    two = check_throttled_time(mounts2, CgroupV2CpuWriter())
    assert two.status == "ok" and "throttled_usec" in two.detail
    # a unified host where no cgroup enables cpu yet: the controller itself says so
    (v2 / "svc" / "cpu.stat").unlink()
    (v2 / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    three = check_throttled_time(mounts2, CgroupV2CpuWriter())
    assert three.status == "ok" and "throttled_usec" in three.detail
