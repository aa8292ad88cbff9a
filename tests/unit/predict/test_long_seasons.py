"""Multi-resolution profiles (predict/rollup.py) and long seasons (predict/longseason.py)."""
from __future__ import annotations

import random

import numpy as np
import pytest

from rswap_ebpf.model.resources import ResourceType
from rswap_ebpf.predict.checkpoint import dumps, loads
from rswap_ebpf.predict.longseason import LongPeriodDetector, LongSeason
from rswap_ebpf.predict.profile import TaskProfile, freeze, thaw
from rswap_ebpf.predict.registry import make_forecaster
from rswap_ebpf.predict.rollup import Rollups

CPU = ResourceType.PROCESSOR_CYCLES


def test_buckets_hold_mean_max_and_quantile_of_their_ticks():
    r = Rollups(tick_s=1.0, widths_s=(10.0, 60.0), capacity=(6, 4), raw_ticks=32)
    xs = [float(i % 10) for i in range(130)]
    for y in xs:
        r.add(y)
    assert r.widths == (10, 60)
    assert r.closed == [13, 2]
    assert len(r.means(0)) == 6  # capacity: the oldest dropped
    assert r.means(0)[-1] == pytest.approx(4.5) and r.maxes(0)[-1] == 9.0
    assert r.quantiles(0)[-1] == pytest.approx(np.quantile(np.arange(10.0), 0.9))
    assert r.means(1).tolist() == pytest.approx([4.5, 4.5]) and r.maxes(1).tolist() == [9.0, 9.0]
    assert r.raw().tolist() == xs[-32:]
    assert r.value_at(129) == 9.0 and r.value_at(90) is None  # older than the raw ticks kept
    assert r.bucket_mean_at(0, 75) == pytest.approx(4.5)


def test_widths_follow_the_tick_and_nest():
    r = Rollups(tick_s=0.5)
    assert r.widths == (20, 120, 1200, 7200)
    odd = Rollups(tick_s=0.3)
    assert all(b % a == 0 for a, b in zip(odd.widths, odd.widths[1:]))


def test_a_profiles_memory_is_bounded_whatever_it_has_seen():
    """Days of ticks later, the arrays are the size they started at: 16 KiB of raw ticks and
    37 KiB of buckets (1 h of 10 s, 1 day of 1 min, 1 week of 10 min, 2 weeks of 1 h)."""
    r = Rollups(tick_s=60.0)  # a minute per tick, so a week is 10,080 samples
    before = r.nbytes()
    for i in range(7 * 24 * 60):
        r.add(float(i % 1440))
    assert r.nbytes() == before == 4096 * 4 + 3 * 4 * (360 + 1440 + 1008 + 336)
    assert len(r._open_ticks) < r.widths[0]


def test_rollups_survive_a_checkpoint_as_data():
    r = Rollups(tick_s=1.0)
    for i in range(5000):
        r.add(float(i % 77))
    back = loads(dumps(r))
    for level in range(4):
        assert back.means(level).tolist() == r.means(level).tolist()
    assert back.raw().tolist() == r.raw().tolist() and back.n == r.n
    back.add(1.0)  # and it goes on learning
    assert back.n == r.n + 1


def _cron(n: int, period: int, busy: int, level: float = 800.0, seed: int = 1) -> list[float]:
    rnd = random.Random(seed)
    return [max(0.0, (level if i % period < busy else 10.0) + rnd.gauss(0, 15)) for i in range(n)]


@pytest.mark.parametrize("period", [300, 2000])
def test_periods_beyond_the_raw_search_are_found_on_buckets_to_the_tick(period):
    r = Rollups(tick_s=0.5)
    d = LongPeriodDetector(min_ticks=120)
    for y in _cron(5 * period if period < 1000 else 4 * period + 500, period, period // 8):
        r.add(y)
        d.update(r)
    assert d.period == period
    assert d.confidence > 0.5


def test_a_weekly_season_is_found_through_hourly_buckets():
    """A week at a 1-minute tick (10,080 ticks), two weeks seen: only the hourly level holds
    two of them; the period comes out in ticks."""
    r = Rollups(tick_s=60.0)
    d = LongPeriodDetector(min_ticks=120)
    week = 7 * 24 * 60
    for i in range(2 * week + 120):
        day, minute = divmod(i % week, 1440)
        busy = day < 5 and 9 * 60 <= minute < 17 * 60  # office hours, weekdays
        r.add(900.0 if busy else 50.0)
        d.update(r)
    # the daily rhythm of weekdays is found first (ten-minute buckets), then the week, which
    # explains the weekends too, on the hourly buckets
    assert d.period == week
    assert d.level == 3 and d.confidence > 0.95


def test_long_season_reads_no_tick_from_its_future():
    r = Rollups(tick_s=1.0)
    xs = _cron(1200, 400, 50)
    m = LongSeason(period=400, rollups=r)
    for y in xs:
        r.add(y)
        m.learn_one(y)
    replayed = LongSeason(period=400, rollups=r, start=len(xs) - 600)
    for y in xs[-600:-100]:
        replayed.learn_one(y)
    # at sample 1100 it forecasts from what was there at 1100, not from the ticks after it
    at = len(xs) - 100
    expect = [xs[at + h - 400] for h in range(5)]
    got = replayed.forecast(5)
    recent = np.mean(xs[at - 10:at]) - np.mean(xs[at - 410:at - 400])
    assert got == pytest.approx([max(0.0, v + 0.5 * recent) for v in expect], rel=1e-5)


def test_selection_follows_a_long_season_and_says_so():
    """A cron every 300 ticks (past the raw search's 120): selection finds it on the buckets,
    a long-season model serves, and the profile names the period and its confidence."""
    prof = TaskProfile("cron", CPU, make_forecaster({"name": "auto", "loss": "mae"}, scale=2000))
    for y in _cron(2400, 300, 40):
        prof.learn_one(y)
    f = prof.forecaster
    assert f.period == 0 and f.long_period == 300
    period, confidence, source = prof.season()
    assert prof.model_name in ("seasonal_long", "seasonal_long_avg", "median", "blend")
    assert (period, source) == (300, "buckets") and confidence > 0.5
    d = prof.describe()
    assert d["period"] == 300 and d["period_source"] == "buckets"
    # the next burst is forecast before it starts (the tick after 2400 is phase 0)
    assert prof.forecast(3)[0] > 400
    # and it survives a checkpoint: same forecasts, the long models reading the same rollups
    back = thaw(freeze(prof))
    assert back.forecast(5) == pytest.approx(prof.forecast(5))
    assert back.forecaster._models["seasonal_long"].rollups is back.forecaster.rollups


def test_no_seasonal_name_on_a_last_value_forecast():
    """Without any period, a seasonal candidate repeats the last value: named last_value."""
    prof = TaskProfile("flat", CPU, make_forecaster({"name": "auto", "loss": "mae"}, scale=100))
    rnd = random.Random(3)
    for _ in range(300):
        prof.learn_one(50.0 + rnd.gauss(0, 1))
    f = prof.forecaster
    assert f.period == 0 and f.long_period == 0
    if f.serving in ("seasonal_naive", "seasonal_fractional", "seasonal_level",
                     "seasonal_long", "seasonal_long_avg"):
        assert prof.model_name == "last_value"
    assert prof.season() == (0, 0.0, "none")
    assert prof.describe()["period"] == 0


def test_the_demo_runs_the_selection_and_no_forecast_exceeds_pool_or_history():
    """rswap run's default configuration names no forecaster (so: auto); on the demo's shape (a
    1.4-CPU burst 4 s in 12, beside a batch job using what is left of 2 CPUs) no forecast goes
    above 1.5 x what the task used, nor above the pool (Holt-Winters, the demo's model before,
    forecast 5.5 CPUs there)."""
    from rswap_ebpf.runtime import config

    cfg = config.load(None)
    assert all(t.forecaster is None for t in cfg.tasks)
    rnd = random.Random(5)
    profs = {t.name: TaskProfile(t.name, CPU, make_forecaster(t.forecaster, scale=2000))
             for t in cfg.tasks}
    for i in range(400):
        web = max(0.0, (1400.0 if i % 12 < 4 else 40.0) + rnd.gauss(0, 80))
        for name, y in (("web", web), ("batch", max(0.0, 1900.0 - web))):
            p = profs[name]
            p.learn_one(y)
            top = max(p.forecast(4))
            assert top <= 2000 and top <= 1.5 * p.peak + 1
    assert profs["web"].forecaster.period == 12
