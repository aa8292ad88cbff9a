"""Path confinement: nothing configured can make rswap write outside the cgroup, resctrl or bpffs
mounts.  Each hostile form (``..``, symlinks, absolute paths elsewhere, NUL bytes, the mount's
root itself) is tried against a fake tree whose layout follows the kernel's (a cgroup2 mount: one
directory per cgroup with ``cgroup.procs`` and ``cpu.max``; a resctrl mount as tests/fakes/resctrl
documents)."""
from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rswap_ebpf.runtime import config
from rswap_ebpf import paths
from rswap_ebpf.host.cgroup import CgroupManager, CgroupMounts, FileApplier, check_task_name
from rswap_ebpf.host.cpu.writer import CgroupV2CpuWriter
from rswap_ebpf.host.journal import Journal
from rswap_ebpf.host.cache.resctrl import GROUP_PREFIX, ResctrlEnforcer
from rswap_ebpf.errors import ConfigError, EnforceError
from tests.fakes.resctrl import FakeResctrl


def tree_digest(root) -> dict[str, bytes]:
    out = {}
    for dirpath, dirnames, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root) + "/"] = b""
    return out


@pytest.fixture
def fake_cgroup(tmp_path):
    """A cgroup2-shaped tree beside an 'outside' directory rswap must never write."""
    cg = tmp_path / "cgroup"
    outside = tmp_path / "outside"
    for d in (cg, cg / "web", outside, outside / "web"):
        d.mkdir(parents=True, exist_ok=True)
        (d / "cgroup.procs").write_text("")
        (d / "cpu.max").write_text("max 100000\n")
        (d / "cpu.weight").write_text("100\n")
    (cg / "evil").symlink_to(outside)               # a symlink out of the mount
    (cg / "web" / "up").symlink_to(cg)              # ...and one that stays inside
    return cg, outside


TOML_TASK = """
[[task]]
name = "t"
cgroup = {value}
"""


@pytest.mark.parametrize("value", [
    '"../etc"', '"a/../../etc"', '"/.."', '"web/../.."', '"web\\u0000x"', '""', '"/"', '"///"',
    '"."', '"./"', '"/./."',
])
def test_config_refuses_cgroup_paths_that_climb_out_or_name_the_root(value):
    with pytest.raises(ConfigError) as exc:
        config.parse(TOML_TASK.format(value=value))
    assert exc.value.field.endswith(".cgroup")


@pytest.mark.parametrize("name", ["../x", "a/b", ".x", "-x", "x\x00", "", "a" * 65, "..", "/abs",
                                  "x y", "x\n"])
def test_task_names_cannot_become_paths(name):
    """Task names become rswap/<name> cgroups and rswap-<name> resctrl groups."""
    with pytest.raises(ConfigError):
        check_task_name(name)


def test_symlink_out_of_the_mount_is_refused_before_any_write(fake_cgroup, tmp_path):
    cg, outside = fake_cgroup
    before = tree_digest(tmp_path)
    mgr = CgroupManager(Journal(str(tmp_path / "state" / "j.jsonl")), CgroupMounts("unified", str(cg)))
    for rel in ("evil", "evil/web", "/evil/web", "web/up/evil"):
        with pytest.raises(ConfigError, match="outside"):
            mgr.resolve("t", rel)
    assert tree_digest(tmp_path) == before


def test_absolute_path_elsewhere_is_taken_inside_the_mount(fake_cgroup, tmp_path):
    cg, outside = fake_cgroup
    mgr = CgroupManager(Journal(str(tmp_path / "state" / "j.jsonl")), CgroupMounts("unified", str(cg)))
    tcg = mgr.resolve("t", str(outside / "web"))
    assert tcg.dirs["unified"] == os.path.join(os.path.realpath(cg), str(outside / "web").lstrip("/"))
    with pytest.raises(ConfigError, match="does not exist"):
        mgr.check_exists(tcg)
    # A symlink that stays inside the mount is followed to where it lands.
    assert mgr.resolve("t", "web/up/web").dirs["unified"] == os.path.realpath(cg / "web")


def test_writes_land_only_in_the_resolved_cgroup(fake_cgroup, tmp_path):
    cg, outside = fake_cgroup
    before_outside = tree_digest(outside)
    j = Journal(str(tmp_path / "state" / "j.jsonl"))
    mgr = CgroupManager(j, CgroupMounts("unified", str(cg)))
    tcg = mgr.resolve("t", "web/up/web")
    FileApplier(j).apply(CgroupV2CpuWriter().plan(tcg, 500))
    assert (cg / "web" / "cpu.max").read_text() == "50000 100000"
    assert tree_digest(outside) == before_outside
    assert j.restore().failed == []
    assert (cg / "web" / "cpu.max").read_text() == "max 100000\n"


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=40))
def test_confine_never_returns_a_path_outside_base(tmp_path_factory, text):
    base = tmp_path_factory.getbasetemp() / "confine-base"
    base.mkdir(exist_ok=True)
    try:
        real = paths.confine(text, str(base))
    except ConfigError as err:
        assert err.field == "path"
        return
    b = os.path.realpath(base)
    assert real == b or real.startswith(b + os.sep)
    assert "\x00" not in text


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=70))
def test_any_accepted_task_name_keeps_resctrl_groups_under_the_root(text):
    try:
        name = check_task_name(text)
    except ConfigError:
        return
    root = "/sys/fs/resctrl"
    group = os.path.normpath(os.path.join(root, GROUP_PREFIX + name))
    assert os.path.dirname(group) == root and "\x00" not in group


def test_resctrl_group_planted_as_symlink_is_refused(tmp_path):
    fake = FakeResctrl(str(tmp_path / "resctrl"), pids=(1,))
    try:
        outside = tmp_path / "outside"
        outside.mkdir()
        os.symlink(outside, os.path.join(fake.root, GROUP_PREFIX + "web"))
        before = tree_digest(outside)
        j = Journal(str(tmp_path / "state" / "j.jsonl"))
        enf = ResctrlEnforcer(j, root=fake.root)
        with pytest.raises(EnforceError, match="already exists"):
            enf.open({"web": "critical"}, mount=False)
        assert tree_digest(outside) == before
        assert j.restore().failed == []
        assert tree_digest(outside) == before
    finally:
        fake.close()


@pytest.mark.parametrize("value", ["../../etc/passwd", "/etc/passwd", "/dev/null", "null",
                                   "sda\u0000", "1:2:3", "x:y", ""])
def test_io_device_that_is_not_a_whole_block_device_is_refused(value):
    from rswap_ebpf.host.io.enforcer import resolve_device

    with pytest.raises(ConfigError):
        resolve_device(value)


@pytest.mark.parametrize("value", ["../x", "a/b", "x\u0000", "", "ns:a/b", "a" * 16, "..", ".",
                                   "..:va", ".:va", "ns/..:va", "eth0 ", ":"])
def test_interface_names_that_are_paths_are_refused(value):
    from rswap_ebpf.host.net.tc import parse_iface

    before = set(os.listdir("/var/run/netns")) if os.path.isdir("/var/run/netns") else set()
    with pytest.raises(ConfigError):
        parse_iface(value)
    after = set(os.listdir("/var/run/netns")) if os.path.isdir("/var/run/netns") else set()
    assert after == before
