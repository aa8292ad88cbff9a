"""Unified hosts: rswap enables cpu/io/memory down to its tasks' parent and undoes it.

The fake follows the documented cgroup2 interface (Documentation/admin-guide/cgroup-v2.rst):
``cgroup.controllers`` lists what a cgroup may enable, ``cgroup.subtree_control`` takes
space-separated ``+name``/``-name`` and reads back the enabled set.
"""
from __future__ import annotations

import os

from rswap_ebpf.host import journal as journalmod
from rswap_ebpf.host.cgroup import CgroupManager, CgroupMounts
from rswap_ebpf.host.journal import Journal


class SubtreeControl:
    """Apply cgroup2's +/- syntax to a plain file (write_file is patched to come through here)."""

    def __init__(self, real_write):
        self.real_write = real_write
        self.writes: list[tuple[str, str]] = []

    def __call__(self, path, value):
        self.writes.append((path, value))
        if not path.endswith("cgroup.subtree_control"):
            return self.real_write(path, value)
        with open(path) as f:
            on = set(f.read().split())
        for tok in value.split():
            (on.add if tok[0] == "+" else on.discard)(tok[1:])
        with open(path, "w") as f:
            f.write(" ".join(sorted(on)) + "\n")


def test_controllers_enabled_root_down_and_restored(tmp_path, monkeypatch):
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("memory\n")
    fake = SubtreeControl(journalmod.write_file)
    monkeypatch.setattr("rswap_ebpf.host.cgroup.write_file", fake)
    monkeypatch.setattr(journalmod, "write_file", fake)

    real_mkdir = os.mkdir

    def mkdir(path, mode=0o777):  # the kernel populates interface files in a new cgroup
        real_mkdir(path, mode)
        with open(os.path.join(path, "cgroup.subtree_control"), "w") as f:
            f.write("\n")
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write("")

    real_rmdir = os.rmdir

    def rmdir(path):  # ... and removes them with the cgroup
        for name in ("cgroup.subtree_control", "cgroup.procs"):
            if os.path.exists(os.path.join(path, name)):
                os.unlink(os.path.join(path, name))
        real_rmdir(path)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "rmdir", rmdir)
    monkeypatch.setattr("rswap_ebpf.paths.CGROUP_ROOT", str(root))
    j = Journal(str(tmp_path / "journal.jsonl"))
    mgr = CgroupManager(j, CgroupMounts("unified", str(root), {}))
    cg = mgr.resolve("web", None)
    mgr.create(cg)
    assert (root / "cgroup.subtree_control").read_text().split() == ["cpu", "io", "memory"]
    assert (root / "rswap" / "cgroup.subtree_control").read_text().split() == ["cpu", "io", "memory"]
    assert os.path.isdir(cg.dirs["unified"])
    report = j.restore()
    assert not report.failed, report.failed
    assert (root / "cgroup.subtree_control").read_text().split() == ["memory"]
    assert not (root / "rswap").exists()


def test_hybrid_hosts_are_left_alone(tmp_path):
    j = Journal(str(tmp_path / "journal.jsonl"))
    mgr = CgroupManager(j, CgroupMounts("hybrid", str(tmp_path), {"cpu": str(tmp_path)}))
    assert mgr.mounts.mode == "hybrid"
    (tmp_path / "cgroup.controllers").write_text("")
    assert mgr.enable_controllers(str(tmp_path)) == []
