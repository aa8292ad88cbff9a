"""seasonal_level: the period's shape at the current burst's level."""
from __future__ import annotations

import random

import pytest

from rswap_ebpf.errors import ConfigError
from rswap_ebpf.predict.forecasters import SeasonalLevel, SeasonalNaive
from rswap_ebpf.predict.registry import make_forecaster
from rswap_ebpf.predict.selection import AutoForecaster
from tests.unit.predict.test_seasonal_fractional import _mae

SHAPE = (0.0, 0.0, 0.0, 0.0, 0.0, 0.6, 1.0, 0.4)  # a burst of three ticks every eight


def _bursts(periods: int, seed: int = 3) -> list[float]:
    """Bursts whose height changes from one period to the next (100 to 800 units)."""
    rnd = random.Random(seed)
    out = []
    for _ in range(periods):
        h = rnd.uniform(100, 800)
        out += [h * s for s in SHAPE]
    return out


def test_a_burst_is_forecast_at_the_height_it_started_with():
    m = SeasonalLevel(period=8)
    for y in [0, 0, 0, 0, 0, 60, 100, 40]:  # last period: 60, 100, 40
        m.learn_one(y)
    for y in [0, 0, 0, 0, 0]:
        m.learn_one(y)
    assert m.forecast(1) == [60.0]          # idle now: last period's start
    m.learn_one(300)                        # this burst starts 5x taller
    # the rest of the last burst's shape (100/60, then 40/60 of its start) at this height
    assert m.forecast(3) == pytest.approx([500.0, 200.0, 0.0])
    m.learn_one(500)
    assert m.forecast(1) == [pytest.approx(500 * 40 / 100)]  # it tails off as the last one did
    m.learn_one(200)
    assert m.forecast(1) == [0.0]           # and ends where the last one ended


def test_the_ratio_is_capped_and_a_busy_tick_after_an_idle_one_adds_the_change():
    m = SeasonalLevel(period=4, max_ratio=2.0)
    for y in [1, 50, 0, 0, 10]:             # y[t-p] = 1, y[t+1-p] = 50: a 50x step
        m.learn_one(y)
    assert m.forecast(1) == [20.0]          # 10 x 2, not 10 x 50
    m2 = SeasonalLevel(period=4)
    for y in [0, 50, 0, 0, 10]:             # busy now, idle a period ago: 10 + (50 - 0)
        m2.learn_one(y)
    assert m2.forecast(1) == [60.0]


def test_without_a_period_of_history_it_is_the_last_value():
    m = SeasonalLevel(period=8)
    assert m.forecast(2) == [0.0, 0.0]
    for y in [5, 7, 9]:
        m.learn_one(y)
    assert m.forecast(2) == [9.0, 9.0]
    one = SeasonalLevel(period=1)
    for y in [5, 7, 9]:
        one.learn_one(y)
    assert one.forecast(1) == [9.0]


def test_bad_parameters_say_which():
    with pytest.raises(ConfigError, match="period"):
        make_forecaster({"name": "seasonal_level", "period": 0})
    with pytest.raises(ConfigError, match="max_ratio"):
        make_forecaster({"name": "seasonal_level", "period": 8, "max_ratio": 0.5})


def test_it_beats_seasonal_naive_on_bursts_whose_height_changes_and_selection_finds_it():
    series = _bursts(40)
    level = _mae(SeasonalLevel(period=8), series, warmup=16)
    naive = _mae(SeasonalNaive(period=8), series, warmup=16)
    assert level < 0.6 * naive
    auto = AutoForecaster(loss="mae", horizon=1)
    picked = _mae(auto, series, warmup=160)
    assert auto.period == 8 and auto.serving == "seasonal_level"
    assert picked < 0.7 * _mae(SeasonalNaive(period=8), series, warmup=160)
