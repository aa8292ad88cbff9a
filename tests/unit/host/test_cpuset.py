"""Core isolation planning (enforce.cpuset): how many cores, which, the hold, never every core,
giving them back; and the CPU driver's tier split.

The fake trees follow the kernel's documented cpuset files (Documentation/admin-guide/
cgroup-v1/cpusets.rst: ``cpuset.cpus``, ``cpuset.mems``, ``cpuset.effective_cpus``; cgroup-v2.rst:
``cpuset.cpus`` empty = the parent's, ``cpuset.cpus.effective``); real writes, moves and the
journal's restore are checked on the kernel in tests/kernel/test_cpuset_kernel.py.
"""
from __future__ import annotations

import doctest
import os

import pytest
from hypothesis import given, strategies as st

from rswap_ebpf.runtime.config import parse
from rswap_ebpf.host.cpu.driver import CpuDriver
from rswap_ebpf.host.cpu import cpuset
from rswap_ebpf.host.cgroup import CgroupMounts, FileApplier, TaskCgroup
from rswap_ebpf.host.cpu.cpuset import (CpusetIsolator, CriticalIsolation, IsolationPolicy,
                                       cores_wanted, cpuset_hierarchy, format_cpulist,
                                       parse_cpulist, split_cores)
from rswap_ebpf.host.journal import Journal
from rswap_ebpf.errors import ConfigError, FeatureMissing
from rswap_ebpf.model.resources import ResourceType


def test_docstring_examples():
    assert doctest.testmod(cpuset).failed == 0


@given(st.frozensets(st.integers(0, 300)))
def test_cpulist_round_trips(cpus):
    assert parse_cpulist(format_cpulist(cpus)) == cpus


@given(st.floats(0, 1e6), st.integers(0, 256), st.floats(1, 5000))
def test_never_every_core_and_at_least_one_during_a_burst(mc, allowed, above):
    n = cores_wanted(mc, allowed, above)
    assert 0 <= n <= max(0, allowed - 1)
    if allowed >= 2 and mc >= above:
        assert n >= 1 and (n == allowed - 1 or n * 1000 >= mc)


@given(st.frozensets(st.integers(0, 63), min_size=1), st.integers(0, 100))
def test_split_keeps_the_lower_tiers_a_core(allowed, n):
    keep, isolated = split_cores(allowed, n)
    assert keep | isolated == allowed and not keep & isolated
    assert keep, "lower tiers always keep at least one core"
    assert len(isolated) == min(n, len(allowed) - 1)
    if isolated:
        assert min(isolated) > max(keep)  # the highest-numbered cores are isolated


def test_policy_rises_at_once_and_falls_after_the_hold():
    p = IsolationPolicy(above_millicores=250, hold_ticks=2, deadband=0.1)
    assert [p.update(m, 4) for m in (100, 1500, 300, 300, 300, 300)] == [0, 2, 2, 2, 1, 1]
    assert [p.update(m, 4) for m in (2500, 50, 50, 50)] == [3, 3, 3, 0]


def test_policy_deadband_stops_flapping_at_a_boundary():
    p = IsolationPolicy(above_millicores=250, hold_ticks=0, deadband=0.1)
    # 1000m needs one core, 1050m two; around 1000 the count must not go 2,1,2,1
    assert [p.update(m, 4) for m in (1050, 980, 1050, 960, 1010)] == [2, 2, 2, 2, 2]
    assert p.update(850, 4) == 1
    # at the burst threshold as well
    assert [p.update(m, 4) for m in (240, 260, 230)] == [1, 1, 1]
    assert p.update(200, 4) == 0


def test_policy_never_isolates_on_one_cpu():
    p = IsolationPolicy(above_millicores=250, hold_ticks=1)
    assert [p.update(m, 1) for m in (5000, 5000)] == [0, 0]


# -- the enforcer against fake trees -------------------------------------------------------

def _v1_tree(tmp_path, cpus="0-3"):
    root = tmp_path / "cpuset"
    root.mkdir()
    for name, value in (("cpuset.cpus", cpus), ("cpuset.mems", "0"),
                        ("cpuset.effective_cpus", cpus), ("cgroup.procs", "")):
        (root / name).write_text(value + "\n")
    unified = tmp_path / "unified"
    unified.mkdir()
    return CgroupMounts("hybrid", str(unified), {"cpuset": str(root), "cpu": str(tmp_path)}), root


def _task(name, owned=True, rel=None):
    return TaskCgroup(name, rel or f"rswap/{name}", {}, owned)


def test_hierarchy_prefers_v1_cpuset_on_hybrid_and_v2_when_enabled(tmp_path):
    mounts, root = _v1_tree(tmp_path)
    assert cpuset_hierarchy(mounts) == ("v1", str(root))
    (tmp_path / "unified" / "cgroup.controllers").write_text("cpuset cpu io\n")
    assert cpuset_hierarchy(CgroupMounts("unified", str(tmp_path / "unified"))) == \
        ("v2", str(tmp_path / "unified"))
    with pytest.raises(FeatureMissing, match="cpuset"):
        cpuset_hierarchy(CgroupMounts("hybrid", str(tmp_path / "nothing"), {"cpu": "/x"}))


def test_dry_run_plans_the_write_and_creates_nothing(tmp_path):
    mounts, root = _v1_tree(tmp_path)
    applier = FileApplier(Journal(str(tmp_path / "j.jsonl")), dry_run=True)
    iso = CriticalIsolation(CpusetIsolator(mounts, applier.journal, applier, dry_run=True),
                            IsolationPolicy(hold_ticks=0))
    state = iso.settle(700, {"b": _task("b")})
    assert state.cores == 1 and state.lower_cpus == {0, 1, 2}
    assert applier.planned == [(str(root / "rswap" / "b" / "cpuset.cpus"), "0-2")]
    assert not (root / "rswap").exists()
    assert not os.path.exists(applier.journal.path)


def test_adopted_v1_cpuset_is_written_in_place_within_its_own_cpus(tmp_path):
    mounts, root = _v1_tree(tmp_path)
    etl = root / "etl.service"
    etl.mkdir()
    (etl / "cpuset.cpus").write_text("2-3\n")
    applier = FileApplier(Journal(str(tmp_path / "j.jsonl")))
    iso = CpusetIsolator(mounts, applier.journal, applier)
    cg = _task("etl", owned=False, rel="etl.service")
    assert iso.cpuset_dir(cg) == str(etl)
    # the plan never widens an admin's cpuset: {0,1,2} & parent's 0-3, written as asked...
    assert iso.plan(cg, frozenset({0, 1, 2})) == [(str(etl / "cpuset.cpus"), "0-2")]
    # ...and gives back the parent's cpus when the burst ends; an adopted cgroup that shares
    # no core with the plan is left alone
    assert iso.plan(cg, None) == [(str(etl / "cpuset.cpus"), "0-3")]
    (root / "cpuset.cpus").write_text("0-1\n")
    assert iso.plan(cg, frozenset({2})) == []


def test_v2_plan_writes_the_list_and_gives_back_the_parents_cores(tmp_path):
    unified = tmp_path / "unified"
    (unified / "rswap" / "b").mkdir(parents=True)
    (unified / "cgroup.controllers").write_text("cpuset cpu\n")
    (unified / "cpuset.cpus.effective").write_text("0-7\n")
    (unified / "rswap" / "cpuset.cpus.effective").write_text("0-6\n")
    (unified / "rswap" / "b" / "cpuset.cpus").write_text("\n")
    mounts = CgroupMounts("unified", str(unified))
    journal = Journal(str(tmp_path / "j.jsonl"))
    iso = CpusetIsolator(mounts, journal, FileApplier(journal))
    cg = TaskCgroup("b", "rswap/b", {"unified": str(unified / "rswap" / "b")}, True)
    assert iso.allowed() == frozenset(range(8))
    done = iso.apply(cg, frozenset({0, 1, 2, 3, 4, 5}))
    assert done == [(str(unified / "rswap" / "b" / "cpuset.cpus"), "0-5")]
    assert iso.current(cg) == frozenset(range(6))
    # a populated v2 cpuset with cores cannot go back to empty (the kernel says ENOSPC): the
    # parent's effective cores are written out instead
    assert iso.restore(cg) == [(str(unified / "rswap" / "b" / "cpuset.cpus"), "0-6")]
    assert iso.current(cg) == frozenset(range(7))
    # the journal holds the original (empty: the parent's cpus) for the final restore
    assert [e["original"] for e in journal.entries() if e["op"] == "write"] == ["\n"]


def test_v2_an_operators_cgroup_that_inherits_its_cores_is_left_alone(tmp_path, caplog):
    """Its empty cpuset.cpus could not be written back while it holds processes."""
    unified = tmp_path / "unified"
    (unified / "ops" / "etl").mkdir(parents=True)
    (unified / "cgroup.controllers").write_text("cpuset cpu\n")
    (unified / "cpuset.cpus.effective").write_text("0-3\n")
    (unified / "ops" / "etl" / "cpuset.cpus").write_text("\n")
    journal = Journal(str(tmp_path / "j.jsonl"))
    iso = CpusetIsolator(CgroupMounts("unified", str(unified)), journal, FileApplier(journal))
    cg = TaskCgroup("etl", "ops/etl", {"unified": str(unified / "ops" / "etl")}, False)
    assert iso.apply(cg, frozenset({0, 1, 2})) == []
    assert iso.apply(cg, frozenset({0, 1})) == []
    assert (unified / "ops" / "etl" / "cpuset.cpus").read_text() == "\n"
    assert journal.entries() == []
    assert sum("leaves this task alone" in r.getMessage() for r in caplog.records) == 1


class _Recorder:
    """Stands in for CpusetIsolator: records which task got which cores."""

    def __init__(self, allowed):
        self._allowed = frozenset(allowed)
        self.dirs: dict[str, str] = {}
        self.calls: list[tuple[str, object]] = []

    def allowed(self):
        return self._allowed

    def apply(self, cg, cpus):
        self.dirs[cg.name] = "d"
        self.calls.append((cg.name, cpus))
        return []

    def restore(self, cg):
        if cg.name in self.dirs:
            self.calls.append((cg.name, None))
        return []

    def forget(self, name):
        self.dirs.pop(name, None)
        self.calls.append((name, "forget"))


class _Live(TaskCgroup):
    def exists(self) -> bool:
        return True


def test_critical_isolation_shrinks_lower_tiers_and_gives_cores_back(tmp_path):
    rec = _Recorder({0, 1})
    iso = CriticalIsolation(rec, IsolationPolicy(hold_ticks=1))
    lower = {"b": _Live("b", "rswap/b", {}, True), "n": _Live("n", "rswap/n", {}, True)}
    iso.settle(100, lower)
    assert rec.calls == []  # no burst: nobody is touched
    iso.settle(800, lower)
    assert rec.calls == [("b", frozenset({0})), ("n", frozenset({0}))]
    rec.calls.clear()
    iso.settle(100, lower)  # held one tick
    assert rec.calls == [("b", frozenset({0})), ("n", frozenset({0}))]
    rec.calls.clear()
    iso.settle(100, {"b": lower["b"]})  # n is gone: forgotten; b gets every core back
    assert rec.calls == [("n", "forget"), ("b", None)]


def test_cpu_driver_protects_from_the_critical_tiers_use_and_shrinks_normal_and_batch():
    """settle() hands the isolation what host.cpu.protect asks for the critical tier (summed
    over its tasks' measured use), and only normal and batch tasks to shrink."""
    from rswap_ebpf.host.cpu.protect import ProtectionPolicy

    seen = {}

    class Iso:
        def settle(self, critical, lower):
            seen.update(critical=critical, lower=sorted(lower))
            return "state"

    drv = CpuDriver.__new__(CpuDriver)
    drv.tier_of, drv.isolation, drv.runq, drv.runq_delay = {}, None, None, {}
    drv.protection = ProtectionPolicy()
    for name, tier in (("web", "critical"), ("db", "critical"), ("etl", "batch"),
                       ("api", "normal")):
        drv.tier_of[name] = tier
    tasks = {n: _task(n) for n in drv.tier_of}
    drv._use = {"web": 300.0, "db": 400.0, "etl": 1000.0}
    assert drv.settle(tasks, {"web": 300, "db": 400}) is None  # isolation off
    drv.isolation = Iso()
    # bursts of 700 millicores every 4 ticks: once the period is seen, the tick before each
    # burst is protected at the burst's level
    demands = []
    for tick in range(16):
        burst = tick % 4 == 3
        drv._use = {"web": 300.0 if burst else 5.0, "db": 400.0 if burst else 5.0, "etl": 1000.0}
        assert drv.settle(tasks, {}) == "state"
        demands.append(seen["critical"])
    assert seen["lower"] == ["api", "etl"]
    assert demands[-4:] == [0.0, 0.0, 700.0, 0.0]


def test_config_option_is_a_bool_and_threshold_a_positive_number():
    cfg = parse('[resources.cpu]\ncritical_isolate = true\ncritical_isolate_above = 400\n'
                '[[task]]\nname = "a"\ncgroup = "x"\n')
    assert cfg.options[ResourceType.PROCESSOR_CYCLES] == {"critical_isolate": True,
                                                          "critical_isolate_above": 400}
    with pytest.raises(ConfigError, match="critical_isolate"):
        parse('[resources.cpu]\ncritical_isolate = "yes"\n')
    with pytest.raises(ConfigError, match="critical_isolate_above"):
        parse('[resources.cpu]\ncritical_isolate_above = 0\n')


def test_doctor_says_ok_or_missing_with_the_fix(tmp_path):
    from rswap_ebpf.cli.doctor import check_cpuset

    mounts, root = _v1_tree(tmp_path)
    ok = check_cpuset(mounts)
    assert ok.status == "ok" and "4 CPUs, at most 3" in ok.detail
    (root / "cpuset.effective_cpus").write_text("0\n")
    one = check_cpuset(mounts)
    assert one.status == "missing" and "no core to isolate" in one.detail
    none = check_cpuset(CgroupMounts("hybrid", str(tmp_path / "unified"), {"cpu": "/x"}))
    assert none.status == "missing" and "cpuset" in none.fix
