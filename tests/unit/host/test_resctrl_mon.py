"""MBM/CMT sensing and the cache / membw drivers, against the fake resctrl mount
(tests/fakes/resctrl.py: Documentation/arch/x86/resctrl.rst, "Reading monitored data")."""
from __future__ import annotations

import os

import pytest

from rswap_ebpf.runtime import config as configmod
from rswap_ebpf.host.registry import DriverContext
from rswap_ebpf.host.cache import driver as cachemod
from rswap_ebpf.host.cache import membw as membwmod
from rswap_ebpf.host.cgroup import CgroupMounts, FileApplier, TaskCgroup
from rswap_ebpf.host.journal import Journal
from rswap_ebpf.errors import FeatureMissing
from rswap_ebpf.host.cache.monitor import MbmCollector
from tests.fakes.resctrl import FakeResctrl


@pytest.fixture
def fake(tmp_path, monkeypatch):
    f = FakeResctrl(str(tmp_path / "resctrl"), cbm_mask="7ff", min_cbm_bits=1, l3_domains=(0, 1),
                    pids=(1, 500, 600))
    monkeypatch.setenv("RSWAP_RESCTRL_ROOT", f.root)
    yield f
    f.close()


def test_mbm_delta_sums_domains_and_skips_unavailable(fake):
    fake.mkdir(os.path.join(fake.root, "g"))
    col = MbmCollector({"web": "g", "host": ""}).open()
    fake.add_traffic("g", 0, 3_000_000)
    fake.add_traffic("g", 1, 1_000_000)
    fake.add_traffic("", 0, 500)
    d = col.drain()
    assert d.total_bytes == {"web": 4_000_000, "host": 500}
    assert d.bytes_per_s("web") > 0
    # A domain whose RMID is not usable reads "Unavailable": no sample, not a zero.
    with open(os.path.join(fake.root, "g", "mon_data", "mon_L3_01", "mbm_total_bytes"), "w") as f:
        f.write("Unavailable\n")
    d = col.drain()
    assert "web" not in d.total_bytes and "web" in d.unavailable
    col.close()


def test_mbm_missing_without_monitoring(tmp_path):
    root = tmp_path / "r"
    (root / "info" / "L3").mkdir(parents=True)
    with pytest.raises(FeatureMissing):
        MbmCollector({"a": ""}, root=str(root)).open()


def _ctx(tmp_path, text):
    cfg = configmod.parse(text)
    j = Journal(str(tmp_path / "state" / "journal.jsonl"))
    return DriverContext(CgroupMounts("unified", None), j, FileApplier(j), cfg)


def _cgroup(tmp_path, name, pids):
    d = tmp_path / "cg" / name
    d.mkdir(parents=True)
    (d / "cgroup.procs").write_text("".join(f"{p}\n" for p in pids))
    return TaskCgroup(name, name, {"unified": str(d)}, False)


CONFIG = """
[resources.cache]
total = "auto"
isolate_default = true
[resources.membw]
total = 100
peak_bytes_per_s = 1000000000
[[task]]
name = "web"
priority = "critical"
pids = [1]
cache = { min = 2 }
[[task]]
name = "batch"
priority = "batch"
pids = [1]
"""


def test_cache_and_membw_drivers_share_one_group_per_task(fake, tmp_path):
    ctx = _ctx(tmp_path, CONFIG)
    cache = cachemod.make(ctx)
    membw = membwmod.make(ctx)
    try:
        cache.open()
        membw.open()
        assert cache.total() == 11 and membw.total() == 100
        tasks = {"web": _cgroup(tmp_path, "web", [500]), "batch": _cgroup(tmp_path, "batch", [600])}
        fake.set_occupancy("rswap-web", 0, 4 * 1441792)  # 4 ways' worth on each domain
        fake.set_occupancy("rswap-web", 1, 4 * 1441792)
        fake.add_traffic("rswap-batch", 0, 10)
        used = cache.measure(tasks)
        bw = membw.measure(tasks)
        assert fake.group_of(500) == "rswap-web" and fake.group_of(600) == "rswap-batch"
        assert used["web"] == pytest.approx(4.0)
        assert set(bw) == {"web", "batch"} and bw["batch"] >= 0.0
        cache.apply(tasks["web"], 6)
        membw.apply(tasks["web"], 45)
        with open(os.path.join(fake.root, "rswap-web", "schemata")) as f:
            # Intel MBA: 45 % is a target for MBM, not a throttle level: unthrottled at first.
            assert f.read() == "L3:0=03f;1=03f\nMB:0=100;1=100\n"
    finally:
        cache.close()
        membw.close()
        ctx.journal.restore()
    assert not any(n.startswith("rswap-") for n in os.listdir(fake.root))
    assert fake.group_of(500) == ""


def test_missing_resctrl_makes_the_driver_missing(tmp_path, monkeypatch):
    ctx = _ctx(tmp_path, CONFIG)
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "filesystems").write_text("nodev\tbpf\n")
    monkeypatch.setenv("RSWAP_PROCFS_ROOT", str(proc))
    monkeypatch.setenv("RSWAP_RESCTRL_ROOT", str(tmp_path / "none"))
    with pytest.raises(FeatureMissing):
        cachemod.make(ctx)


def test_one_domain_task_fills_its_share_on_its_socket(fake, tmp_path):
    """A task running on one socket of a two-socket host holds its ways in that socket's L3
    only: judged per domain it fills its share (an average over domains would read half)."""
    ctx = _ctx(tmp_path, CONFIG)
    cache = cachemod.make(ctx)
    try:
        cache.open()
        tasks = {"web": _cgroup(tmp_path, "web", [500]), "batch": _cgroup(tmp_path, "batch", [600])}
        cache.apply(tasks["web"], 4)
        fake.set_occupancy("rswap-web", 0, 4 * 1441792)   # socket 0: all 4 ways
        fake.set_occupancy("rswap-web", 1, 0)             # socket 1: nothing
        used = cache.measure(tasks)
        assert used["web"] == pytest.approx(4.0)
        assert used["web"] >= cachemod.FILL * cache.rs.enforcer.ways["web"]
    finally:
        cache.close()
        ctx.journal.restore()


def test_one_domain_bandwidth_is_judged_per_domain_not_summed(fake, tmp_path):
    """An MB value applies per domain: traffic all on one socket is twice the use of the same
    bytes spread over two."""
    ctx = _ctx(tmp_path, CONFIG)
    membw = membwmod.make(ctx)
    try:
        membw.open()
        tasks = {"web": _cgroup(tmp_path, "web", [500]), "batch": _cgroup(tmp_path, "batch", [600])}
        membw.measure(tasks)
        fake.add_traffic("rswap-web", 0, 400_000_000)       # one socket
        fake.add_traffic("rswap-batch", 0, 200_000_000)     # the same bytes over two sockets
        fake.add_traffic("rswap-batch", 1, 200_000_000)
        bw = membw.measure(dict(tasks))   # a new tick (the shared sample is per tick object)
        assert bw["web"] > 0 and bw["web"] == pytest.approx(2 * bw["batch"], rel=1e-6)
        # the peak seen is the busiest domain's total: 600 MB on domain 0, not 800 MB summed
        assert membw.seen_peak == pytest.approx(bw["web"] / 100 * 1e9 * 1.5, rel=1e-6)
    finally:
        membw.close()
        ctx.journal.restore()


def test_mba_throttle_level_is_steered_by_measured_bandwidth_not_equated(fake, tmp_path):
    """Intel MB values are throttle levels (resctrl.rst: the same level gives different bandwidth
    with different threads): the allocation is what MBM must show, the level moves toward it."""
    ctx = _ctx(tmp_path, CONFIG)
    membw = membwmod.make(ctx)
    mb = lambda: fake.groups["rswap-web"]["MB"]  # noqa: E731
    try:
        membw.open()
        tasks = {"web": _cgroup(tmp_path, "web", [500]), "batch": _cgroup(tmp_path, "batch", [600])}
        membw.apply(tasks["web"], 30)
        assert mb() == {0: 100, 1: 100}
        for expect in (90, 80, 70):        # far above 30 % of 1 GB/s on domain 0: a step a tick
            fake.add_traffic("rswap-web", 0, 10**12)
            membw.measure(dict(tasks))
            # An MB value applies per domain: domain 1 saw nothing and stays unthrottled.
            assert mb() == {0: expect, 1: 100}
        membw.measure(dict(tasks))          # no traffic: below its allocation, one step back
        assert mb() == {0: 80, 1: 100}
        fake.add_traffic("rswap-web", 1, 10**12)
        membw.measure(dict(tasks))          # now domain 1 is over, domain 0 under
        assert mb() == {0: 90, 1: 90}
        membw.apply(tasks["web"], 100)      # the whole domain: unthrottled at once
        assert mb() == {0: 100, 1: 100}
    finally:
        membw.close()
        ctx.journal.restore()
