"""The work-conserving CPU design (issue #21), on fake cgroup trees and plain series.

Fakes follow the kernel's documented cgroup files: v1 ``cpu.cfs_quota_us`` (-1 = no limit),
``cpu.shares`` (2..262144), ``cpu.idle``; v2 ``cpu.max`` ("max" = no limit), ``cpu.weight``
(1..10000) (Documentation/admin-guide/cgroup-v2.rst, scheduler/sched-bwc.rst).
"""
from __future__ import annotations

import os

import pytest

from rswap_ebpf.host.cgroup import CgroupMounts, TaskCgroup
from rswap_ebpf.host.cpu.writer import CpuShape
from rswap_ebpf.host.cpu.driver import CpuDriver, tier_shapes, weight_plan
from rswap_ebpf.host.cpu.protect import ProtectionPolicy, find_period
from rswap_ebpf.host.cpu.runq import SLOTS, RunqDelta, RunqHistogram, cpu_pressure_some_us, histograms


def _v1_task(tmp_path, name):
    d = tmp_path / name
    d.mkdir()
    (d / "cpu.cfs_period_us").write_text("100000\n")
    (d / "cpu.cfs_quota_us").write_text("-1\n")
    (d / "cpu.shares").write_text("1024\n")
    return TaskCgroup(name, name, {"cpu": str(d)}, True)


def _driver(tmp_path):
    drv = CpuDriver(CgroupMounts("hybrid", None, {"cpu": str(tmp_path)}), applier=None,
                    collector=object(), tiers=tier_shapes({}))
    for name, tier in (("web", "critical"), ("etl", "batch"), ("api", "normal")):
        drv.set_priority(name, tier)
    return drv


def _files(writes):
    return {os.path.basename(p): v for p, v in writes}


def test_weights_layer_no_quota_on_critical_or_batch_whatever_their_units(tmp_path):
    drv = _driver(tmp_path)
    web, etl, api = (_v1_task(tmp_path, n) for n in ("web", "etl", "api"))
    for units in (100, 1500):
        own = lambda w: {os.path.basename(p): v for p, v in w if os.path.dirname(p) != str(tmp_path)}
        assert own(drv.plan(web, units)) == {"cpu.cfs_quota_us": "-1", "cpu.shares": "10240"}
        assert own(drv.plan(etl, units)) == {"cpu.cfs_quota_us": "-1", "cpu.shares": "2"}
    # the normal tier keeps a quota that follows its units
    assert _files(drv.plan(api, 300))["cpu.cfs_quota_us"] == "30000"


def test_rswaps_parent_cgroup_carries_its_tasks_weight(tmp_path):
    """Under rswap/ the tasks compete with the host's processes through the parent: it gets the
    sum of its tasks' shares, not the default 1024.  Batch tasks live in rswap-batch/, whose
    shares are the bottom weight per task: a parent's weight goes to whichever child can run,
    so a batch task under rswap/ would meet the host at the critical weight."""
    root, broot = tmp_path / "rswap", tmp_path / "rswap-batch"
    for d in (root, broot):
        d.mkdir()
        (d / "cpu.shares").write_text("1024\n")
    drv = _driver(root)
    web, api = (_v1_task(root, n) for n in ("web", "api"))
    etl = _v1_task(broot, "etl")
    assert (str(broot / "etl" / "cpu.shares"), "2") in drv.plan(etl, 100)
    assert (str(broot / "cpu.shares"), "2") in drv.plan(etl, 100)
    assert (str(root / "cpu.shares"), "10240") in drv.plan(web, 100)
    assert (str(root / "cpu.shares"), str(10240 + 1024)) in drv.plan(api, 300)
    # a second batch task: the parent carries both; critical's parent is unchanged by them
    drv.set_priority("etl2", "batch")
    etl2 = _v1_task(broot, "etl2")
    assert (str(broot / "cpu.shares"), "4") in drv.plan(etl2, 100)
    assert (str(root / "cpu.shares"), str(10240 + 1024)) in drv.plan(api, 300)
    adopted = TaskCgroup("web", "system.slice/web", {"cpu": str(root / "web")}, False)
    assert all(os.path.dirname(p) != str(root) for p, _ in drv.plan(adopted, 100))


def test_batch_parent_goes_idle_with_its_tasks(tmp_path):
    broot = tmp_path / "rswap-batch"
    broot.mkdir()
    for f, v in (("cpu.shares", "1024"), ("cpu.idle", "0")):
        (broot / f).write_text(v + "\n")
    drv = CpuDriver(CgroupMounts("hybrid", None, {"cpu": str(tmp_path)}), applier=None,
                    collector=object(), tiers=tier_shapes({"batch_idle": True}))
    drv.set_priority("etl", "batch")
    etl = _v1_task(broot, "etl")
    (broot / "etl" / "cpu.idle").write_text("0\n")
    assert (str(broot / "cpu.idle"), "1") in drv.plan(etl, 100)


def test_weights_layer_v2_and_batch_idle_and_weight_scaling(tmp_path):
    d = tmp_path / "b"
    d.mkdir()
    (d / "cpu.idle").write_text("0\n")
    assert weight_plan("v2", str(d), "critical", CpuShape(weight=8.0)) == [
        (str(d / "cpu.max"), "max"), (str(d / "cpu.weight"), "10000")]
    assert weight_plan("v2", str(d), "batch", CpuShape(idle=True)) == [
        (str(d / "cpu.max"), "max"), (str(d / "cpu.idle"), "1")]
    # a smaller critical_weight lowers the critical tier's shares, within the kernel's bounds
    assert weight_plan("v1", str(d), "critical", CpuShape(weight=1.0))[1][1] == "1280"
    assert weight_plan("v1", str(d), "critical", CpuShape(weight=1000.0))[1][1] == "262144"


def test_period_found_in_bursts_not_in_steady_load_or_a_ramp():
    assert find_period([10] * 6 + [900] * 2) == 0          # one burst: not yet a period
    assert find_period(([10] * 6 + [900] * 2) * 3) == 8
    steady = [600 + (7 * i % 5) for i in range(64)]
    assert find_period(steady) == 0
    ramp = [100 + 10 * i for i in range(40)]
    assert find_period(ramp) == 0


def test_bursts_are_protected_a_tick_ahead_and_released_after():
    p = ProtectionPolicy(above_millicores=500)
    series = ([20] * 6 + [950, 950]) * 4
    out = [p.update(u, 10.0) for u in series]
    # last period: the tick before each burst tick asks for the burst's level, the rest nothing
    assert out[-8:] == [0, 0, 0, 0, 0, 950, 950, 0]
    assert p.period == 8


def test_steady_service_is_left_to_the_weights_even_when_delayed():
    """Below most of a core, a delayed steady service is not worth a core of batch's."""
    p = ProtectionPolicy()
    out = [p.update(600 + (i % 3), 5000.0) for i in range(40)]
    assert set(out) == {0.0}


def test_feedback_protects_a_busy_hurt_tier_and_adds_a_core_while_still_hurt():
    p = ProtectionPolicy(full_millicores=900, runq_target_us=1000)
    assert p.update(950, 200.0) == 0.0            # busy but not delayed: weights suffice
    assert p.update(950, 4000.0) == 950.0         # busy and delayed: protect the next tick
    assert p.update(950, 4000.0) == 1950.0        # protected and still delayed: one core more
    assert p.update(950, 200.0) == 0.0            # fine again: released
    assert p.update(300, 9000.0) == 0.0           # delayed while nearly idle: not worth a core


def test_runq_histogram_quantiles_and_merge_by_cgroup():
    h = histograms([(7, 1, 90), (7, 5, 10), (8, 3, 4)], {7: 100_000, 8: 40_000})
    assert h[7].n == 100 and h[7].quantile_us(0.5) == 2.0 and h[7].quantile_us(0.99) == 32.0
    assert h[7].mean_us() == pytest.approx(1.0)
    both = RunqDelta(10**9, h).of([7, 8, 9])
    assert both.n == 104 and both.total_ns == 140_000
    assert RunqHistogram().quantile_us(0.99) == 0.0
    assert len(histograms([(1, 99, 1)], {})[1].counts) == SLOTS  # out-of-range slot clamped


def test_psi_read_where_the_cgroup_has_it(tmp_path):
    assert cpu_pressure_some_us(str(tmp_path)) is None          # v1 cpu dir: no cpu.pressure
    (tmp_path / "cpu.pressure").write_text("some avg10=0.00 avg60=0.00 avg300=0.00 total=1234\n"
                                           "full avg10=0.00 avg60=0.00 avg300=0.00 total=99\n")
    assert cpu_pressure_some_us(str(tmp_path)) == 1234


def test_an_operators_max_is_the_one_quota_a_critical_task_gets(tmp_path):
    drv = _driver(tmp_path)
    web = _v1_task(tmp_path, "web")
    drv.set_limit("web", 600)
    own = {os.path.basename(p): v for p, v in drv.plan(web, 100) if "/web/" in p}
    assert own == {"cpu.cfs_quota_us": "60000", "cpu.shares": "10240"}
    drv.set_limit("web", None)
    assert (str(tmp_path / "web" / "cpu.cfs_quota_us"), "-1") in drv.plan(web, 100)


def test_a_critical_task_outweighs_unmanaged_siblings_under_rswap(tmp_path):
    """Another rswap's tasks under rswap/ (1024 shares each) are the critical task's siblings:
    it takes ten times their sum, and the parent carries theirs plus ours."""
    root = tmp_path / "rswap"
    root.mkdir()
    for other in ("etl_steady", "web_day"):
        (root / other).mkdir()
        (root / other / "cpu.shares").write_text("1024\n")
    drv = _driver(root)
    web = _v1_task(root, "web")
    writes = dict(drv.plan(web, 100))
    assert writes[str(root / "web" / "cpu.shares")] == str(10 * 2048)
    assert writes[str(root / "cpu.shares")] == str(10 * 2048 + 2048)
