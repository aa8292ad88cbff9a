"""Unified hosts found by tools/vm_test (Debian 12, 6.1): adopted cgroups and evacuation.

The fake tree follows the documented cgroup2 interface (Documentation/admin-guide/cgroup-v2.rst):
a child has ``cpu.max`` only when its parent's ``cgroup.subtree_control`` enables cpu, and a
non-root cgroup that enables a controller for its children may hold no process itself.
"""
from __future__ import annotations

from rswap_ebpf.host import journal as journalmod
from rswap_ebpf.host.cgroup import CgroupManager, CgroupMounts
from rswap_ebpf.host.journal import Journal, _process_home
from tests.unit.host.test_cgroup_v2_controllers import SubtreeControl


def cgroup(path, enabled=""):
    path.mkdir(parents=True, exist_ok=True)
    (path / "cgroup.procs").write_text("")
    (path / "cgroup.subtree_control").write_text(enabled + "\n")
    return path


def test_an_adopted_cgroup_gets_its_ancestors_controllers_and_restore_takes_them_back(
        tmp_path, monkeypatch):
    root = cgroup(tmp_path / "cg", "memory pids")
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    cgroup(root / "app.slice")
    cgroup(root / "app.slice" / "web.service")
    fake = SubtreeControl(journalmod.write_file)
    monkeypatch.setattr("rswap_ebpf.host.cgroup.write_file", fake)
    monkeypatch.setattr(journalmod, "write_file", fake)
    j = Journal(str(tmp_path / "journal.jsonl"))
    mgr = CgroupManager(j, CgroupMounts("unified", str(root), {}))
    cg = mgr.resolve("web", "app.slice/web.service")
    mgr.adopt(cg)
    # Root down to the adopted cgroup's parent; the adopted cgroup itself is left as it was.
    assert (root / "cgroup.subtree_control").read_text().split() == ["cpu", "io", "memory", "pids"]
    assert (root / "app.slice" / "cgroup.subtree_control").read_text().split() == ["cpu", "io", "memory"]
    assert (root / "app.slice" / "web.service" / "cgroup.subtree_control").read_text().split() == []
    assert not j.restore().failed
    assert (root / "cgroup.subtree_control").read_text().split() == ["memory", "pids"]
    assert (root / "app.slice" / "cgroup.subtree_control").read_text().split() == []
    assert (root / "app.slice" / "web.service").is_dir()


def test_adopt_changes_nothing_on_hybrid_hosts(tmp_path):
    j = Journal(str(tmp_path / "journal.jsonl"))
    mgr = CgroupManager(j, CgroupMounts("hybrid", str(tmp_path / "unified"), {"cpu": str(tmp_path)}))
    mgr.adopt(mgr.resolve("web", "web"))
    assert j.entries() == []


def test_evacuation_goes_to_the_nearest_ancestor_that_may_hold_processes(tmp_path):
    root = cgroup(tmp_path / "cg", "cpu io memory")
    rswap = cgroup(root / "rswap", "cpu io memory")  # enables controllers: no processes here
    task = cgroup(rswap / "web")
    assert _process_home(str(task)) == str(root)  # the mount's root always takes them
    plain = cgroup(root / "plain")
    assert _process_home(str(cgroup(plain / "child"))) == str(plain)
    # v1: no cgroup.subtree_control, the parent takes them.
    v1 = tmp_path / "v1" / "cpu"
    (v1 / "rswap" / "web").mkdir(parents=True)
    (v1 / "rswap" / "cgroup.procs").write_text("")
    assert _process_home(str(v1 / "rswap" / "web")) == str(v1 / "rswap")
