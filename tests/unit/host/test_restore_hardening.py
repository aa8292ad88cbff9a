"""``rswap restore`` against journals it should not fully trust, and the cgroups it leaves behind.

The cgroup trees here are temporary directories that follow the documented kernel interfaces
(Documentation/admin-guide/cgroup-v1/cgroups.rst and cgroup-v2.rst): a new cgroup comes with a
``cgroup.procs`` file; writing a pid to a ``cgroup.procs`` moves that process out of whichever
cgroup held it; ``rmdir`` fails with EBUSY while the cgroup holds a process; cgroup2's
``cgroup.subtree_control`` takes ``+name``/``-name``.
"""
from __future__ import annotations

import errno
import json
import os

import pytest

from rswap_ebpf.host import journal as journalmod
from rswap_ebpf.host.cgroup import CgroupManager, CgroupMounts
from rswap_ebpf.host.journal import Journal
from tests.unit.host.test_cgroup_v2_controllers import SubtreeControl


# -- a cgroup tree in a temporary directory ---------------------------------------------------

class FakeCgroupFs:
    """mkdir/rmdir/write_file with the kernel's cgroup semantics, below ``root`` only."""

    def __init__(self, root, monkeypatch, v2=False):
        self.root = str(root)
        self.v2 = v2
        self._mkdir, self._rmdir = os.mkdir, os.rmdir
        self.subtree = SubtreeControl(journalmod.write_file)
        monkeypatch.setattr(os, "mkdir", self.mkdir)
        monkeypatch.setattr(os, "rmdir", self.rmdir)
        monkeypatch.setattr(journalmod, "write_file", self.write)
        monkeypatch.setattr("rswap_ebpf.host.cgroup.write_file", self.write)

    def _ours(self, path):
        return os.path.realpath(path).startswith(os.path.realpath(self.root) + os.sep)

    def mkdir(self, path, mode=0o777):
        self._mkdir(path, mode)
        if self._ours(path):
            self.populate(path)

    def populate(self, path, procs=(), enabled=""):
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write("".join(f"{p}\n" for p in procs))
        if self.v2:
            with open(os.path.join(path, "cgroup.subtree_control"), "w") as f:
                f.write(enabled + "\n")

    def rmdir(self, path):
        if not self._ours(path):
            return self._rmdir(path)
        if self.procs(path):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)
        if any(os.path.isdir(os.path.join(path, n)) for n in os.listdir(path)):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)
        for name in os.listdir(path):
            os.unlink(os.path.join(path, name))
        self._rmdir(path)

    @staticmethod
    def procs(path):
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(p) for p in f.read().split()]

    def write(self, path, value):
        if os.path.basename(path) != "cgroup.procs":
            return self.subtree(path, value)
        pid = int(value)
        for dirpath, _, files in os.walk(self.root):
            if "cgroup.procs" in files:
                p = os.path.join(dirpath, "cgroup.procs")
                left = [x for x in self.procs(dirpath) if x != pid]
                with open(p, "w") as f:
                    f.write("".join(f"{x}\n" for x in left))
        with open(path, "a") as f:
            f.write(f"{pid}\n")


@pytest.fixture
def v1(tmp_path, monkeypatch):
    """A v1 ``cpu`` hierarchy: the mount's root holds pid 1."""
    root = tmp_path / "cgroup"
    mnt = root / "cpu"
    mnt.mkdir(parents=True)
    monkeypatch.setenv("RSWAP_CGROUP_ROOT", str(root))
    fs = FakeCgroupFs(root, monkeypatch)
    fs.populate(str(mnt), procs=[1])
    return fs, mnt


def v1_manager(tmp_path, mnt):
    j = Journal(str(tmp_path / "state" / "journal.jsonl"))
    return j, CgroupManager(j, CgroupMounts("legacy", None, {"cpu": str(mnt)}))


# -- 1. the shared rswap/ parent --------------------------------------------------------------

def test_restore_removes_the_parent_it_created_even_when_a_task_outlived_the_daemon(tmp_path, v1):
    """A killed daemon's command task is still running: restore used to move it into rswap/
    (the v1 parent), which then could not be removed and stayed behind for good (a later run
    finds it existing and never journals it).  It goes to the hierarchy's root instead."""
    fs, mnt = v1
    j, mgr = v1_manager(tmp_path, mnt)
    cg = mgr.resolve("web", None)
    mgr.create(cg)
    fs.write(os.path.join(cg.dirs["cpu"], "cgroup.procs"), "500")  # the task rswap started
    assert [e["shared"] for e in j.entries() if e["op"] == "mkdir"] == [True, False]
    report = j.restore()
    assert report.failed == []
    assert not (mnt / "rswap").exists()
    assert fs.procs(str(mnt)) == [1, 500]
    assert not os.path.exists(j.path)


def test_a_parent_rswap_did_not_create_keeps_its_place(tmp_path, v1):
    """rswap/ made by someone else (another run, still going): not rswap's to remove, and the
    evacuated task goes to the nearest parent, as before."""
    fs, mnt = v1
    os.mkdir(mnt / "rswap")
    os.mkdir(mnt / "rswap" / "other-run-task")
    j, mgr = v1_manager(tmp_path, mnt)
    cg = mgr.resolve("web", None)
    mgr.create(cg)
    fs.write(os.path.join(cg.dirs["cpu"], "cgroup.procs"), "500")
    assert not j.restore().failed
    assert not os.path.exists(cg.dirs["cpu"])
    assert (mnt / "rswap" / "other-run-task").is_dir()
    assert fs.procs(str(mnt / "rswap")) == [500]


def test_a_created_parent_still_used_by_another_run_stays(tmp_path, v1):
    fs, mnt = v1
    j, mgr = v1_manager(tmp_path, mnt)
    mgr.create(mgr.resolve("web", None))
    os.mkdir(mnt / "rswap" / "job-1")  # another daemon's task arrived meanwhile
    assert not j.restore().failed
    assert (mnt / "rswap" / "job-1").is_dir()
    assert not (mnt / "rswap" / "web").exists()


def test_a_created_parent_holding_only_stray_processes_is_emptied_and_removed(tmp_path, v1):
    """What the old restore left: rswap/ with the processes it evacuated into it."""
    fs, mnt = v1
    j, mgr = v1_manager(tmp_path, mnt)
    mgr.create(mgr.resolve("web", None))
    os.rmdir(mnt / "rswap" / "web")
    fs.write(str(mnt / "rswap" / "cgroup.procs"), "700")
    assert not j.restore().failed
    assert not (mnt / "rswap").exists()
    assert 700 in fs.procs(str(mnt))


# -- 2. a hostile journal ---------------------------------------------------------------------

@pytest.fixture
def mounts(tmp_path, monkeypatch):
    """Configured roots in a temporary tree, a victim file outside them, and a symlink out."""
    cg = tmp_path / "cgroup"
    (cg / "cpu" / "web").mkdir(parents=True)
    (cg / "cpu" / "web" / "cpu.cfs_quota_us").write_text("1000\n")
    (tmp_path / "resctrl").mkdir()
    (tmp_path / "bpf").mkdir()
    outside = tmp_path / "etc"
    outside.mkdir()
    (outside / "victim").write_text("precious\n")
    (outside / "keepdir").mkdir()
    os.symlink(outside, cg / "cpu" / "escape")
    monkeypatch.setenv("RSWAP_CGROUP_ROOT", str(cg))
    monkeypatch.setenv("RSWAP_RESCTRL_ROOT", str(tmp_path / "resctrl"))
    monkeypatch.setenv("RSWAP_BPFFS_ROOT", str(tmp_path / "bpf"))
    monkeypatch.delenv("RSWAP_PIN_DIR", raising=False)
    return cg, outside


def hostile_entries(cg, outside) -> list[dict]:
    victim = str(outside / "victim")
    return [
        {"op": "write", "path": victim, "original": "pwned"},                       # elsewhere
        {"op": "write", "path": f"{cg}/cpu/../../etc/victim", "original": "pwned"},  # ..
        {"op": "write", "path": f"{cg}/cpu/escape/victim", "original": "pwned"},     # symlink
        {"op": "write", "path": f"{cg}/cpu/web/cpu.cfs_quota_us\x00", "original": "1"},  # NUL
        {"op": "write", "path": "etc/victim", "original": "pwned"},                 # relative
        {"op": "write", "path": 42, "original": "pwned"},                           # not a path
        {"op": "mkdir", "path": str(outside / "keepdir"), "shared": False},
        {"op": "move", "pid": 1, "procs": victim},
        {"op": "custom", "kind": "cgroup_controllers", "data": {"path": victim,
                                                                 "enabled": ["cpu"]}},
        {"op": "custom", "kind": "blkio", "data": {"path": victim, "original": "pwned"}},
        {"op": "custom", "kind": "resctrl", "data": {"action": "schemata", "root": str(outside),
                                                     "group": "", "original": "pwned"}},
        {"op": "custom", "kind": "resctrl", "data": {"action": "mkdir", "root": str(cg.parent /
                                                     "resctrl"), "group": "../etc/keepdir"}},
        {"op": "custom", "kind": "tc_root", "data": {"name": "eth0", "netns": ".."}},
        {"op": "custom", "kind": "ifb", "data": {"name": "../x", "netns": None}},
        {"op": "unlink", "path": victim},
    ]


def write_journal(path, entries):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for e in entries:
            f.write(json.dumps(e) + "\n")


def test_a_hostile_journal_is_refused_entry_by_entry_and_the_rest_restored(tmp_path, mounts):
    cg, outside = mounts
    quota = cg / "cpu" / "web" / "cpu.cfs_quota_us"
    hostile = hostile_entries(cg, outside)
    good = {"op": "write", "path": str(quota), "original": "50000\n"}
    jpath = str(tmp_path / "state" / "journal.jsonl")
    write_journal(jpath, [good] + hostile)
    report = Journal(jpath).restore()
    assert quota.read_text() == "50000\n"  # the honest entry is restored
    assert report.restored == 1
    assert (outside / "victim").read_text() == "precious\n"
    assert (outside / "keepdir").is_dir()
    assert len(report.refused) == len(hostile), report.refused
    assert all(r in report.failed for r in report.refused)
    assert any("NUL" in r for r in report.refused)
    assert any("outside the cgroup, resctrl and bpffs mounts" in r for r in report.refused)
    assert os.path.exists(jpath)  # kept for the operator to inspect


def test_every_honest_kind_of_entry_passes_the_check(tmp_path, mounts):
    """What rswap itself journals names paths inside the mounts and plain interface names."""
    cg, _ = mounts
    res = str(cg.parent / "resctrl")
    entries = [
        {"op": "write", "path": str(cg / "cpu" / "web" / "cpu.cfs_quota_us"), "original": "1\n"},
        {"op": "mkdir", "path": str(cg / "cpu" / "rswap"), "shared": True},
        {"op": "move", "pid": 1, "procs": str(cg / "cpu" / "cgroup.procs")},
        {"op": "custom", "kind": "resctrl", "data": {"action": "mount", "root": res}},
        {"op": "custom", "kind": "resctrl", "data": {"action": "move", "root": res, "tid": 5,
                                                     "group": ""}},
        {"op": "custom", "kind": "tc_root", "data": {"name": "veth0", "netns": "t1234c"}},
        {"op": "custom", "kind": "ifb", "data": {"name": "rswap-ifb0", "netns": None}},
    ]
    bases = journalmod.allowed_roots()
    assert [journalmod._refusal(e, bases) for e in entries] == [None] * len(entries)


# -- 3. cgroup2 controllers other cgroups came to use -----------------------------------------

@pytest.fixture
def v2(tmp_path, monkeypatch):
    root = tmp_path / "cgroup"
    root.mkdir()
    monkeypatch.setenv("RSWAP_CGROUP_ROOT", str(root))
    fs = FakeCgroupFs(root, monkeypatch, v2=True)
    fs.populate(str(root), procs=[1], enabled="memory")
    (root / "cgroup.controllers").write_text("cpu io memory pids\n")
    j = Journal(str(tmp_path / "state" / "journal.jsonl"))
    mgr = CgroupManager(j, CgroupMounts("unified", str(root), {}))
    return fs, root, j, mgr


def enabled(d):
    return (d / "cgroup.subtree_control").read_text().split()


def test_controllers_nobody_else_uses_are_switched_off(v2):
    fs, root, j, mgr = v2
    mgr.create(mgr.resolve("web", None))
    os.mkdir(root / "system.slice")  # appeared since, settings left at the defaults
    (root / "system.slice" / "cpu.weight").write_text("100\n")
    (root / "system.slice" / "cpu.max").write_text("max 100000\n")
    assert enabled(root) == ["cpu", "io", "memory"]
    assert not j.restore().failed
    assert enabled(root) == ["memory"]
    assert not (root / "rswap").exists()


def test_a_controller_another_cgroup_came_to_use_is_left_on(v2):
    """An operator set a CPU weight on a service after rswap enabled cpu at the root, and a
    slice passes io on to its children: switching either off would drop their settings."""
    fs, root, j, mgr = v2
    mgr.create(mgr.resolve("web", None))
    os.mkdir(root / "db.service")
    (root / "db.service" / "cpu.weight").write_text("400\n")
    (root / "db.service" / "io.max").write_text("")
    os.mkdir(root / "app.slice")
    fs.subtree(str(root / "app.slice" / "cgroup.subtree_control"), "+io")
    assert not j.restore().failed
    assert enabled(root) == ["cpu", "io", "memory"]  # memory was on before; cpu, io in use
    # rswap's own parent and task are gone all the same.
    assert not (root / "rswap").exists()


def test_only_the_controllers_in_use_stay(v2):
    fs, root, j, mgr = v2
    mgr.create(mgr.resolve("web", None))
    os.mkdir(root / "batch.slice")
    (root / "batch.slice" / "memory.high").write_text("max\n")
    (root / "batch.slice" / "io.weight").write_text("default 50\n")
    assert not j.restore().failed
    assert enabled(root) == ["io", "memory"]
