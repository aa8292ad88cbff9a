"""The allocation floor's release: after a burst that has ended at the same phase of its period
several periods in a row, the next allocation may drop below the use just seen.

The swap manager never allocates less than the use seen on the tick before
(``SwapManager.demand``), which holds each burst's level for the tick after it: slack every
period.  ``AutoForecaster.release`` says how far that floor may drop; ``SwapManager``,
``replay`` and the daemon's tick use it, and selection scores candidates against the same floor.
"""
from __future__ import annotations

import json

import pytest

from rswap_ebpf.predict.checkpoint import dumps, loads
from rswap_ebpf.errors import ConfigError
from rswap_ebpf.predict.registry import make_forecaster
from rswap_ebpf.predict.selection import AutoForecaster
from rswap_ebpf.offline.replay import replay
from rswap_ebpf.model.resources import ResourceId, ResourcePool, ResourceType
from rswap_ebpf.model.limits import Limits, Priority
from rswap_ebpf.swap.manager import ManagedTask, SwapManager
from rswap_ebpf.offline.trace import Trace
from tests.unit.host.test_coproc_multi import Card, _daemon

CPU = ResourceType.PROCESSOR_CYCLES
FPGA = ResourceId(ResourceType.SPECIALIZED_COPROC, "fpga0")

# a period of 6 ticks: 3 busy at 100, then 3 idle at 5
BURST = [100.0, 100.0, 100.0, 5.0, 5.0, 5.0]


def _fed(samples, **kw) -> AutoForecaster:
    a = AutoForecaster(candidates=("seasonal_naive", "last_value"), period=6, horizon=1, **kw)
    for y in samples:
        a.learn_one(y)
    return a


def test_release_is_the_next_phase_level_where_every_recent_burst_ended_here():
    a = _fed(BURST * 4)
    assert a.release() is None                        # last sample idle: nothing to release
    for _ in range(2):
        a.learn_one(100.0)
    assert a.release() is None                        # mid-burst: the next tick was busy too
    a.learn_one(100.0)                                # the burst's last tick
    assert a.release() == pytest.approx(5.0)


def test_no_release_without_enough_periods_a_period_or_a_steady_end():
    assert _fed(BURST * 2 + BURST[:3], release_after=3).release() is None  # 2 bursts ended
    assert _fed(BURST * 2 + BURST[:3], release_after=2).release() == pytest.approx(5.0)
    assert _fed(BURST * 4 + BURST[:3], release_after=0).release() is None  # off
    # one of the last three bursts ran a tick longer: it did not end here every time
    longer = BURST * 2 + [100.0] * 4 + [5.0] * 2 + BURST + BURST[:3]
    assert _fed(longer).release() is None
    flat = AutoForecaster(candidates=("last_value", "seasonal_naive"), horizon=1)
    for y in BURST[:3] * 20:
        flat.learn_one(y)
    assert flat.period == 0 and flat.release() is None


def test_release_after_is_checked_and_old_checkpoints_keep_the_floor():
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ConfigError, match="release_after"):
            AutoForecaster(release_after=bad)
    f = make_forecaster({"name": "auto", "release_after": 0})
    assert f.release_after == 0
    a = _fed(BURST * 4 + BURST[:3])
    state = loads(dumps(a)).__getstate__()
    del state["release_after"]                        # a checkpoint from before the release
    old = AutoForecaster.__new__(AutoForecaster)
    old.__setstate__(state)
    assert old.release_after == 0 and old.release() is None
    assert loads(dumps(a)).release() == a.release() == pytest.approx(5.0)


def test_the_released_floor_is_scored_so_the_raise_covers_what_it_leaves_open():
    """Scored with the floor, a tick the floor covers leaves no positive residual: with the
    release, a tick above the released floor is one the raise has to cover."""
    def last_residual(k):
        a = AutoForecaster(candidates=("seasonal_naive",), period=6, horizon=1, quantile=0.9,
                           release_after=k)
        for y in BURST * 5 + BURST[:3]:
            a.learn_one(y)
        a.learn_one(80.0)  # this burst ends late: 80 where the last five periods had 5
        return a._resid["seasonal_naive"][0][-1]

    assert last_residual(0) == pytest.approx(0.0)     # under the floor of 100: covered
    assert last_residual(3) == pytest.approx(75.0)    # above the released floor of 5: short


def _manager():
    pool = ResourcePool()
    pool.register_resource(CPU, 2000)
    m = SwapManager(pool, headroom=0.0)
    m.add_task(ManagedTask("web", Priority.NORMAL, {CPU: Limits()}))
    return m


def test_manager_drops_to_the_release_and_never_raises_the_floor_for_it():
    m = _manager()
    m.proactive_allocation({"web": {CPU: 100.0}}, {"web": {CPU: 900.0}})
    assert m.pool.allocation(CPU, "web") == 900       # held at the use just seen
    m.proactive_allocation({"web": {CPU: 100.0}}, {"web": {CPU: 900.0}}, {"web": {CPU: 50.0}})
    assert m.pool.allocation(CPU, "web") == 100       # the forecast, not the floor
    m.proactive_allocation({"web": {CPU: 100.0}}, {"web": {CPU: 300.0}}, {"web": {CPU: 700.0}})
    assert m.pool.allocation(CPU, "web") == 300       # a release above the use is no floor
    m.proactive_allocation({"web": {CPU: 100.0}}, {"web": {CPU: 300.0}}, {"web": {CPU: None}})
    assert m.pool.allocation(CPU, "web") == 300
    m.proactive_allocation({"web": {CPU: 10.0}}, {"web": {CPU: 300.0}},
                           {"web": {CPU: float("nan")}})
    assert m.pool.allocation(CPU, "web") == 300       # a bad value releases nothing


def _bursty_trace(n=120):
    web = tuple(BURST[i % 6] * 10 for i in range(n))  # 1000 millicores for 3 s, 50 for 3
    return Trace(tuple(float(i) for i in range(n)), {("web", CPU): web})


def test_replay_lets_go_after_each_burst_once_the_end_has_repeated():
    tr = _bursty_trace()
    spec = {"name": "auto", "candidates": ["seasonal_naive", "last_value"], "period": 6}
    held = replay(tr, ["proactive"], forecaster={**spec, "release_after": 0}, totals={CPU: 2000})
    freed = replay(tr, ["proactive"], forecaster=spec, totals={CPU: 2000})
    # without the release, every tick after a burst is held at 1000 for a demand of 50
    assert held.total("proactive", "slack") >= 0.9 * 950 * (120 // 6 - 2)
    assert freed.total("proactive", "slack") < 0.35 * held.total("proactive", "slack")
    assert freed.total("proactive", "shortfall") <= held.total("proactive", "shortfall")


def test_the_daemon_tick_lets_go_after_a_repeated_burst(tmp_path, monkeypatch):
    """The daemon's own tick: a co-processor whose use is 6 units for 2 ticks, 0 for 2."""
    def run(release_after: int) -> list[int]:
        d_path = tmp_path / f"r{release_after}"
        d_path.mkdir()
        monkeypatch.setenv("RSWAP_STATE_DIR", str(d_path / "state"))
        monkeypatch.setenv("RSWAP_RUN_DIR", str(d_path / "run"))
        card = Card(d_path, "fpga0")
        text = f"""
[daemon]
interval = 0.1
window = 1
headroom = 0.5
hold_ticks = 0
max_step_down = 0.99
critical_floor = 0
[resources.coproc.fpga0]
total = 16
probe = {json.dumps(card.probe)}
apply = {json.dumps(card.apply)}
[[task]]
name = "web"
priority = "normal"
command = ["sleep", "60"]
forecaster = {{ name = "auto", candidates = ["seasonal_naive"], period = 4, loss = "mae", release_after = {release_after} }}
coproc = {{ fpga0 = {{ min = 0 }} }}
"""
        d = _daemon(d_path, text)
        d.start()
        held = []
        try:
            for i in range(20):
                card.uses(web=6 if i % 4 >= 2 else 0)
                d.tick()
                held.append(d.pool.allocation(FPGA, "web"))
        finally:
            d.stop()
        return held

    held, freed = run(0), run(3)
    # the allocation made after the burst's last tick (i % 4 == 3) for the idle tick after it
    after = [i for i in range(12, 20) if i % 4 == 3]
    assert all(held[i] >= 9 for i in after)           # 6 + 50 %, held by the floor
    assert all(freed[i] == 0 for i in after)          # the forecast (0): the floor let go
    assert freed[:15] == held[:15]                    # the same until 3 bursts have ended
