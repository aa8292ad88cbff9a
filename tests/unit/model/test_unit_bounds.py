"""Units are bounded to what the kernel files take; minimums must fit the pool (exit 2)."""
from __future__ import annotations

import io
import os

import pytest

from rswap_ebpf.errors import ConfigError
from rswap_ebpf.model.resources import (MAX_UNITS, ResourcePool, ResourceType, check_units,
                                        unit_limit)
from rswap_ebpf.runtime import config
from tests.conftest import run_rswap

CPU = ResourceType.PROCESSOR_CYCLES
IO = ResourceType.STORAGE_IOPS


@pytest.mark.parametrize("value", [1e308, 1e300, "1e300", 9223372036854775807, 8192 * 1000 + 1,
                                   10**400])
def test_cpu_units_beyond_the_cfs_quota_range_are_refused(value):
    with pytest.raises(ConfigError, match="more than the kernel takes: at most 8192000 millicores"):
        check_units(value, "cpu.total", CPU)


def test_every_bound_fits_a_signed_64_bit_kernel_value():
    for r in ResourceType:
        assert 0 < unit_limit(r) <= MAX_UNITS
        assert check_units(unit_limit(r), "x", r) == unit_limit(r)
    assert check_units(MAX_UNITS, "io.max", IO) == MAX_UNITS
    with pytest.raises(ConfigError, match="at most"):
        check_units(MAX_UNITS + 1, "io.max", IO)
    with pytest.raises(ConfigError, match="at most"):
        check_units(2.0**63, "units")  # no resource: still bounded
    with pytest.raises(ConfigError, match="at most 100 percent"):
        check_units(101, "membw", ResourceType.MEMORY_BANDWIDTH)
    with pytest.raises(ConfigError):
        ResourcePool().register_resource(CPU, 10**12)


BASE = """
[resources.cpu]
total = {total}
[[task]]
name = "web"
cgroup = "web"
cpu = {{ min = {min}, max = {max} }}
[[task]]
name = "batch"
cgroup = "batch"
cpu = {{ min = {min2} }}
"""


@pytest.mark.parametrize("total,lo,hi,lo2,field", [
    ("1e308", 0, 100, 0, "total"),
    (2000, 9223372036854775807, 9223372036854775807, 0, "min"),
    (2000, 0, "1e300", 0, "max"),
])
def test_config_units_out_of_bounds_are_refused(total, lo, hi, lo2, field):
    with pytest.raises(ConfigError, match="more than the kernel takes") as exc:
        config.parse(BASE.format(total=total, min=lo, max=hi, min2=lo2))
    assert exc.value.field.endswith(field) and exc.value.exit_status == 2


def test_minimums_that_add_up_to_more_than_the_pool_are_refused():
    config.parse(BASE.format(total=2000, min=1200, max=1500, min2=800))  # exactly fits
    with pytest.raises(ConfigError, match=r"minimums add up to 2100 millicores \(web 1200, "
                                          r"batch 900\), more than the total 2000"):
        config.parse(BASE.format(total=2000, min=1200, max=1500, min2=900))


def test_run_with_unbounded_units_exits_2_before_anything_is_applied(tmp_path, rswap_env):
    cfg = tmp_path / "c.toml"
    cfg.write_text(BASE.format(total=2000, min=9223372036854775807, max=9223372036854775807,
                               min2=0))
    r = run_rswap("run", "--config", str(cfg), env=rswap_env)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "task web.cpu.min" in r.stderr
    assert not os.path.exists(os.path.join(rswap_env["state"], "journal.jsonl"))


@pytest.fixture
def scheduler(tmp_path, rswap_env):
    from rswap_ebpf.host.cgroup import CgroupMounts
    from rswap_ebpf.runtime.daemon import Daemon
    from rswap_ebpf.server.scheduler import Scheduler
    from tests.unit.server.test_metrics import CONFIG, TRACE, ReplayDriver

    cgroot = tmp_path / "cgroup"
    for n in ("web", "batch", "spare"):
        (cgroot / n).mkdir(parents=True)
        (cgroot / n / "cgroup.procs").write_text("")
    d = Daemon(config.parse(CONFIG), drivers=[ReplayDriver(TRACE)],
               mounts=CgroupMounts("unified", str(cgroot)), out=io.StringIO())
    d.start()
    s = Scheduler(d)
    try:
        d.tick()
        yield s
    finally:
        s.close()
        d.stop()


def _add(s, **cpu):
    from rswap_ebpf.server.control import Peer

    try:
        return s.dispatch({"op": "task.add", "name": "spare", "cgroup": "spare", "cpu": cpu},
                          Peer(os.getpid(), 0, 0))
    except ConfigError as err:  # the control server turns these into {"ok": false, ...}
        from rswap_ebpf.server.control import error_reply

        return error_reply(err)


def test_task_add_with_a_huge_min_is_refused_and_nothing_changes(scheduler):
    d = scheduler.daemon
    before = sorted(d.tasks)
    r = _add(scheduler, min=1e300)
    assert r["ok"] is False and "more than the kernel takes" in r["error"]
    assert r["field"] == "task spare.cpu.min"
    # CONFIG's pool: 2000 millicores, web min 100, batch min 200
    r = _add(scheduler, min=1701)
    assert r["ok"] is False and "minimums add up to 2001 millicores" in r["error"], r
    assert sorted(d.tasks) == before
    r = _add(scheduler, min=1700)
    assert r["ok"] is True, r
