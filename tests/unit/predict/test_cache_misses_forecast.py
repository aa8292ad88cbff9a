"""Cache misses reach the Cache forecasts: the daemon's real control plane (profiler, swap manager,
pool) over the cache driver, with resctrl as the fake mount (tests/fakes/resctrl.py, the kernel's
documented tree) and the PMU replayed from recorded per-cgroup counter values
(:class:`PmuReplay`, the PmuDelta the BPF collector drains; tests/kernel/test_pmu_kernel.py checks
the BPF program produces those deltas from replayed hardware counters).

Both tasks always fill the ways they hold (CMT occupancy = allocation), which occupancy alone
cannot tell from wanting more.  web's misses triple at tick 6; batch's never change.
"""
from __future__ import annotations

import io
import os

import pytest

from rswap_ebpf.runtime import config as configmod
from rswap_ebpf.runtime.daemon import Daemon
from rswap_ebpf.host.registry import DriverContext
from rswap_ebpf.host.cache.driver import CacheDriver, ResctrlShared
from rswap_ebpf.host.cgroup import CgroupMounts, FileApplier
from rswap_ebpf.host.journal import Journal
from rswap_ebpf.model.resources import ResourceType
from rswap_ebpf.host.cache.pmu import PmuReplay
from tests.fakes.resctrl import FakeResctrl

CACHE = ResourceType.CACHE
WAY_BYTES = 1441792  # what one way holds per domain in the fake's ``size``

CONFIG = """
[daemon]
window = 2
headroom = 0.0
[resources.cache]
total = "auto"
isolate_default = false
[[task]]
name = "web"
priority = "critical"
cgroup = "web"
forecaster = "last_value"
cache = { min = 2 }
[[task]]
name = "batch"
priority = "batch"
cgroup = "batch"
forecaster = "last_value"
cache = { min = 2 }
"""

TICKS = 9
RISE_AT = 6  # web misses 1000/s before, 3000/s from this tick on; batch 5000/s throughout


def _run(tmp_path, monkeypatch, with_pmu: bool):
    fake = FakeResctrl(str(tmp_path / "resctrl"), cbm_mask="7ff", min_cbm_bits=1,
                       l3_domains=(0, 1), pids=(1, 500, 600))
    monkeypatch.setenv("RSWAP_RESCTRL_ROOT", fake.root)
    cgroot = tmp_path / "cgroup"
    ids = {}
    for name, pid in (("web", 500), ("batch", 600)):
        (cgroot / name).mkdir(parents=True)
        (cgroot / name / "cgroup.procs").write_text(f"{pid}\n")
        ids[name] = os.stat(cgroot / name).st_ino
    cfg = configmod.parse(CONFIG)
    mounts = CgroupMounts("unified", str(cgroot))
    journal = Journal(str(tmp_path / "resctrl-journal.jsonl"))
    rs = ResctrlShared(DriverContext(mounts, journal, FileApplier(journal), cfg))
    rows = [{ids["web"]: (1000 if t < RISE_AT else 3000, 10_000), ids["batch"]: (5000, 20_000)}
            for t in range(1, TICKS + 1)]
    driver = CacheDriver(rs, PmuReplay(rows) if with_pmu else None)
    d = Daemon(cfg, drivers=[driver], mounts=mounts, out=io.StringIO())
    d.start()
    seen = []
    try:
        for _ in range(TICKS):
            for name in ("web", "batch"):  # each task fills exactly what its mask gives it
                for dom in (0, 1):
                    fake.set_occupancy(f"rswap-{name}", dom,
                                       d.pool.allocation(CACHE, name) * WAY_BYTES)
            rep = d.tick()
            seen.append({n: (d.pool.allocation(CACHE, n), rep.forecasts[n][CACHE])
                         for n in ("web", "batch")})
        return seen, dict(driver.miss_baseline)
    finally:
        d.stop()
        journal.restore()
        fake.close()


def test_rising_misses_grow_the_cache_forecast_and_calm_misses_do_not(tmp_path, monkeypatch):
    seen, baseline = _run(tmp_path, monkeypatch, with_pmu=True)
    before, after = seen[:RISE_AT - 1], seen[RISE_AT - 1:]
    # Calm: both fill their 2 ways at their usual miss rate -> nobody is grown.
    assert all(t["web"][0] == 2 and t["batch"][0] == 2 for t in before[1:]), seen
    # web's misses triple while it fills its ways: the sample its profile learns doubles its
    # ways, so its forecast and allocation climb at once, taking ways from batch down to its min.
    assert after[0]["web"][1] >= 4 and after[0]["web"][0] >= 4, seen
    assert after[-1]["web"][0] == 9 and after[-1]["batch"][0] == 2, seen
    assert all(t["batch"][1] <= 2 for t in seen), seen    # batch's forecast never rose
    assert baseline["web"] == pytest.approx(1000) and baseline["batch"] == pytest.approx(5000)


def test_without_the_pmu_occupancy_alone_grows_every_task_that_fills_its_ways(tmp_path,
                                                                              monkeypatch):
    """The same run without misses: the manager's occupancy rule cannot tell batch (full, but
    missing no more) from a task that wants more, and grows both."""
    seen, _ = _run(tmp_path, monkeypatch, with_pmu=False)
    assert max(t["batch"][1] for t in seen[:RISE_AT - 1]) >= 4, seen
