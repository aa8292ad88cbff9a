"""Confinement against the real kernel: netns names, cgroupfs, and restore of a vanished netns."""
from __future__ import annotations

import errno
import os
import subprocess

import pytest

from rswap_ebpf.host.cgroup import CgroupManager, detect_mounts
from rswap_ebpf.host.journal import Journal
from rswap_ebpf.host.net.htb import ROOT_KIND
from rswap_ebpf.host.net.tc import CLSACT_KIND, FILTER_KIND, parse_iface
from rswap_ebpf.errors import ConfigError
from tests.kernel.helpers import scratch_cgroup

NETNS_DIR = "/var/run/netns"


def netns_names() -> set[str]:
    return set(os.listdir(NETNS_DIR)) if os.path.isdir(NETNS_DIR) else set()


def test_restore_never_creates_a_network_namespace_that_is_gone(rswap_env, unique_name):
    """The namespace a journalled qdisc lived in was deleted: its qdiscs went with it.  Restoring
    must skip them, not create an empty namespace of that name (pyroute2 does by default)."""
    gone = f"{unique_name}g"
    j = Journal(os.path.join(rswap_env["state"], "journal.jsonl"))
    j.record_custom(CLSACT_KIND, {"name": "va", "netns": gone})
    j.record_custom(FILTER_KIND, {"name": "va", "netns": gone, "parent": "ffff:fff3"})
    j.record_custom(ROOT_KIND, {"name": "va", "netns": gone, "kind": "pfifo_fast", "handle": 0})
    try:
        report = j.restore()
        assert gone not in netns_names()
        assert report.failed == []
    finally:
        if gone in netns_names():
            subprocess.run(["ip", "netns", "del", gone], check=False)


@pytest.mark.parametrize("text", ["..:lo", ".:lo", "../run:lo", "..:..", "lo/..:lo"])
def test_netns_names_that_are_paths_create_nothing(text):
    before = netns_names()
    with pytest.raises(ConfigError):
        parse_iface(text)
    assert netns_names() == before


def test_cgroupfs_has_no_symlinks_so_escapes_need_a_fake_tree(unique_name):
    """Why tests/unit/host/test_confine.py plants its symlinks in a fake tree: cgroupfs refuses them."""
    mounts = detect_mounts()
    with scratch_cgroup(f"cf-{unique_name}") as dirs:
        for d in dirs.values():
            with pytest.raises(OSError) as exc:
                os.symlink("/etc", os.path.join(d, "evil"))
            assert exc.value.errno in (errno.EPERM, errno.EACCES, errno.EOPNOTSUPP)
        mgr = CgroupManager(Journal("/nonexistent/j"), mounts)
        cg = mgr.resolve("t", f"/cf-{unique_name}")  # absolute: from each hierarchy's root
        assert cg.dirs == {h: os.path.join(m, f"cf-{unique_name}")
                           for h, m in mounts.hierarchies.items()}
        mgr.check_exists(cg)
