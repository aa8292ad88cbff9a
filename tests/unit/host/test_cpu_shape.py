"""Tier shapes of the CPU writers (burst, weight, idle) against a fake cgroup tree.

The fake follows the kernel's documented files: v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``/
``cpu.cfs_burst_us``/``cpu.shares``/``cpu.idle`` and v2 ``cpu.max``/``cpu.max.burst``/
``cpu.weight``/``cpu.idle`` (Documentation/scheduler/sched-bwc.rst, admin-guide/cgroup-v2.rst),
including the bound burst <= quota that the kernel checks on every write.
"""
from __future__ import annotations

import os

import pytest

from rswap_ebpf.runtime.config import Config, DaemonConfig, parse
from rswap_ebpf.runtime.daemon import Daemon, TaskRuntime
from rswap_ebpf.host.cpu.driver import TIER_SHAPES, tier_shapes
from rswap_ebpf.host.cgroup import CgroupMounts, TaskCgroup
from rswap_ebpf.host.cpu.writer import CgroupV1CpuWriter, CgroupV2CpuWriter, CpuShape, burst_supported
from rswap_ebpf.errors import ConfigError
from rswap_ebpf.predict.forecasters import SeasonalNaive
from rswap_ebpf.model.resources import ResourceType

CPU = ResourceType.PROCESSOR_CYCLES


def _tree(tmp_path, files: dict[str, str]) -> str:
    d = tmp_path / "task"
    d.mkdir()
    for name, value in files.items():
        (d / name).write_text(value + "\n")
    return str(d)


@pytest.fixture
def v1(tmp_path):
    d = _tree(tmp_path, {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "-1",
                         "cpu.cfs_burst_us": "0", "cpu.shares": "1024", "cpu.idle": "0"})
    return TaskCgroup("svc", "svc", {"cpu": d}, True), d


def _names(writes):
    return [os.path.basename(p) for p, _ in writes]


def test_v1_critical_shape_adds_one_quota_of_burst_and_weight(v1):
    cg, d = v1
    w = CgroupV1CpuWriter().plan(cg, 200, CpuShape(burst=True, weight=8.0))
    assert dict((os.path.basename(p), v) for p, v in w) == {
        "cpu.cfs_quota_us": "20000", "cpu.cfs_burst_us": "20000", "cpu.shares": str(200 * 1024 * 8 // 1000)}
    # growing from burst 0: the quota goes first, so burst <= quota holds after each write
    assert _names(w)[:2] == ["cpu.cfs_quota_us", "cpu.cfs_burst_us"]


def test_v1_shrinking_burst_is_written_before_the_quota(v1):
    cg, d = v1
    with open(os.path.join(d, "cpu.cfs_burst_us"), "w") as f:
        f.write("50000\n")
    w = CgroupV1CpuWriter().plan(cg, 100, CpuShape(burst=True))
    assert _names(w)[:2] == ["cpu.cfs_burst_us", "cpu.cfs_quota_us"]
    assert w[0][1] == "10000"


def test_v1_plain_shape_is_quota_and_shares_only(v1):
    cg, _ = v1
    assert _names(CgroupV1CpuWriter().plan(cg, 300)) == ["cpu.cfs_quota_us", "cpu.shares"]


def test_v1_idle_group_gets_cpu_idle_and_no_shares(v1):
    cg, _ = v1
    w = CgroupV1CpuWriter().plan(cg, 1500, CpuShape(idle=True))
    assert w[-1][1] == "1" and _names(w) == ["cpu.cfs_quota_us", "cpu.idle"]


def test_burst_is_left_out_where_the_kernel_has_no_file(tmp_path):
    d = _tree(tmp_path, {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "-1",
                         "cpu.shares": "1024"})
    cg = TaskCgroup("svc", "svc", {"cpu": d}, True)
    assert _names(CgroupV1CpuWriter().plan(cg, 200, CpuShape(burst=True, idle=False))) == [
        "cpu.cfs_quota_us", "cpu.shares"]
    assert burst_supported(CgroupMounts("legacy", None, {"cpu": str(tmp_path)})) is None
    (tmp_path / "cpu.cfs_burst_us").write_text("0\n")
    assert burst_supported(CgroupMounts("legacy", None, {"cpu": str(tmp_path)})) == "cpu.cfs_burst_us"


def test_shares_and_weight_stay_inside_the_kernel_bounds(v1, tmp_path):
    cg, _ = v1
    w = dict((os.path.basename(p), v) for p, v in
             CgroupV1CpuWriter().plan(cg, 2000, CpuShape(weight=1000.0)))
    assert w["cpu.shares"] == "262144"
    d2 = tmp_path / "v2"
    d2.mkdir()
    for name, value in {"cpu.max": "max 100000", "cpu.max.burst": "0", "cpu.weight": "100"}.items():
        (d2 / name).write_text(value + "\n")
    cg2 = TaskCgroup("svc", "svc", {"unified": str(d2)}, True)
    w2 = dict((os.path.basename(p), v) for p, v in
              CgroupV2CpuWriter().plan(cg2, 200, CpuShape(burst=True, weight=8.0)))
    assert w2 == {"cpu.max": "20000 100000", "cpu.max.burst": "20000", "cpu.weight": "160"}
    w3 = dict((os.path.basename(p), v) for p, v in
              CgroupV2CpuWriter().plan(cg2, 2000, CpuShape(weight=1000.0)))
    assert w3["cpu.weight"] == "10000"


def test_tier_shapes_from_resources_cpu_options():
    assert tier_shapes({}) == TIER_SHAPES
    s = tier_shapes({"critical_burst": False, "critical_weight": 2.0, "batch_idle": True})
    assert s["critical"] == CpuShape(burst=False, weight=2.0)
    assert s["batch"] == CpuShape(idle=True)
    assert TIER_SHAPES["batch"] == CpuShape()  # off by default: see drivers.cpu
    cfg = parse("[resources.cpu]\ncritical_weight = 4.0\nbatch_idle = true\n")
    assert cfg.options[CPU] == {"critical_weight": 4.0, "batch_idle": True}
    with pytest.raises(ConfigError, match="critical_weight"):
        parse("[resources.cpu]\ncritical_weight = 0.5\n")
    with pytest.raises(ConfigError, match="critical_floor"):
        parse("[daemon]\ncritical_floor = 1.5\n")


def _daemon_with(priority: str, floor: float, pattern: list[float]) -> Daemon:
    d = Daemon(Config(DaemonConfig(window=2, critical_floor=floor), {CPU: 2000}, ()))
    d.pool.register_resource(CPU, 2000)
    d.tasks["svc"] = TaskRuntime("svc", priority, TaskCgroup("svc", "svc", {}, True))
    prof = d.profiler.profile("svc", CPU)
    prof.forecaster = SeasonalNaive(period=len(pattern))
    for _ in range(2):
        for y in pattern:
            d.profiler.update_prediction("svc", CPU, y)
    return d


def _forecast(d: Daemon) -> dict:
    """The daemon pipeline's Forecast stage for its one task "svc"."""
    return d.pipeline.forecast.for_task("svc", d.tasks["svc"].priority).peak


# a season of 8 ticks: 6 idle at 10m, then 2 at 400m; the next two ticks are idle ones
SEASON = [10, 10, 10, 10, 10, 10, 400, 400]


def test_critical_task_keeps_its_seasonal_floor_between_bursts():
    d = _daemon_with("critical", 0.9, SEASON)
    assert _forecast(d)[CPU] == pytest.approx(400)


def test_floor_off_or_lower_tiers_follow_the_window():
    assert _forecast(_daemon_with("critical", 0.0, SEASON))[CPU] == pytest.approx(10)
    assert _forecast(_daemon_with("batch", 0.9, SEASON))[CPU] == pytest.approx(10)
    # a task busy in one tick of 8 keeps little: the 0.5 quantile of its season is idle
    assert _forecast(_daemon_with("critical", 0.5, [10] * 7 + [400]))[CPU] == pytest.approx(10)


def test_cpu_floor_is_recorded_but_a_critical_task_has_no_quota_to_hold_it(v1, tmp_path):
    """A critical task's seasonal floor still reaches the CPU driver (set_floor, floors), but the
    weights layer gives the task no quota at all: never capped below what the host could give
    it (issue #21: the forecast-sized quota made its quiet requests slower than alone's), and
    its units, so what batch is left, follow the window's forecast."""
    from rswap_ebpf.host.cpu.driver import CpuDriver
    from rswap_ebpf.model.limits import Limits, Priority
    from rswap_ebpf.swap.manager import ManagedTask

    cg, d_ = v1
    drv = CpuDriver(CgroupMounts("hybrid", None, {"cpu": str(tmp_path)}), applier=None,
                    collector=object(), tiers=TIER_SHAPES)
    d = _daemon_with("critical", 0.9, SEASON)
    d.drivers[CPU] = drv
    d.manager.add_task(ManagedTask("svc", Priority.CRITICAL, {CPU: Limits(100, None)}))
    drv.set_priority("svc", "critical")
    fc = d.pipeline.forecast.for_task("svc", "critical")
    assert fc.peak[CPU] == pytest.approx(10)              # the units follow the window...
    floors = {("svc", r): v for r, v in fc.floors.items()}
    assert d.pipeline.enforce.keep_floors(floors, {"svc"}) == {("svc", CPU)}
    assert drv.floors == {"svc": 480}                      # ...the floor is kept, for the API
    for units in (100, 900):
        writes = dict((os.path.basename(p), v) for p, v in drv.plan(cg, units))
        assert writes == {"cpu.cfs_quota_us": "-1", "cpu.shares": "10240"}
    assert d.pipeline.enforce.keep_floors(floors, {"svc"}) == set()  # unchanged: no rewrite
    d.tasks.pop("svc")
    d.pipeline.enforce.keep_floors({}, set())
    assert drv.floors == {}


def test_burst_on_a_unified_host_where_no_cgroup_has_cpu_yet(tmp_path, monkeypatch):
    from rswap_ebpf.host.cpu import writer as cgroup_mod

    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (tmp_path / "system.slice").mkdir()  # systemd's slices, cpu not enabled: no cpu.* files
    mounts = CgroupMounts("unified", str(tmp_path), {})
    monkeypatch.setattr(cgroup_mod, "_kernel_at_least", lambda major, minor: True)
    assert burst_supported(mounts) == "cpu.max.burst"  # 6.1 has it though no file shows it yet
    monkeypatch.setattr(cgroup_mod, "_kernel_at_least", lambda major, minor: False)
    assert burst_supported(mounts) is None  # a 5.10 kernel does not
    (tmp_path / "cgroup.controllers").write_text("memory pids\n")
    monkeypatch.setattr(cgroup_mod, "_kernel_at_least", lambda major, minor: True)
    assert burst_supported(mounts) is None  # no cpu controller offered at all


def test_kernel_release_comparison():
    from rswap_ebpf.host.cpu.writer import _kernel_at_least

    assert _kernel_at_least(5, 14, "6.1.0-50-amd64")
    assert _kernel_at_least(5, 14, "5.14.0")
    assert not _kernel_at_least(5, 14, "5.10.209-1")
    assert not _kernel_at_least(5, 14, "garbage")
