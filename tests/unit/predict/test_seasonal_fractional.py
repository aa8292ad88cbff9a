"""Seasonal-naive for periods that are not a whole number of ticks (run, sleep, repeat)."""
from __future__ import annotations

import random

import pytest

from rswap_ebpf.errors import ConfigError
from rswap_ebpf.predict.forecasters import SeasonalFractional, SeasonalNaive
from rswap_ebpf.predict.registry import make_forecaster
from rswap_ebpf.predict.selection import AutoForecaster


def _bursts(period: float, n: int = 200, busy: float = 2.0, height: float = 300.0,
            noise: float = 0.0, seed: int = 1) -> list[float]:
    """What a 1 s tick measures of a job busy ``busy`` s every ``period`` s (``fio; sleep``)."""
    rnd = random.Random(seed)
    out = []
    for t in range(n):
        used = 0.0
        k = int(t // period) - 1
        while k * period < t + 1:
            start, end = k * period, k * period + busy
            used += max(0.0, min(t + 1, end) - max(t, start))
            k += 1
        out.append(max(0.0, height * used + (rnd.gauss(0, noise) if noise else 0.0)))
    return out


def _mae(model, series, warmup=60):
    errs = []
    for i, y in enumerate(series):
        if i >= warmup:
            errs.append(abs(y - model.forecast(1)[0]))
        model.learn_one(y)
    return sum(errs) / len(errs)


@pytest.mark.parametrize("period, whole, offset", [(8.3, 8, 0.3), (8.7, 9, -0.3)])
def test_a_period_between_ticks_is_found_and_forecast(period, whole, offset):
    series = _bursts(period, noise=5.0)
    frac, naive = SeasonalFractional(period=whole), SeasonalNaive(period=whole)
    frac_mae, naive_mae = _mae(frac, series), _mae(naive, series)
    assert frac.offset == pytest.approx(offset, abs=0.08)
    # not 0: interpolating between ticks is exact except in a tick where the burst starts or ends
    assert frac_mae < 0.8 * naive_mae, (frac_mae, naive_mae)


def test_a_whole_period_is_seasonal_naive():
    series = _bursts(8.0)
    frac, naive = SeasonalFractional(period=8), SeasonalNaive(period=8)
    for y in series:
        frac.learn_one(y)
        naive.learn_one(y)
    assert frac.offset == 0.0
    assert frac.forecast(20) == naive.forecast(20)


def test_forecasts_past_one_period_repeat_the_fitted_period():
    f = SeasonalFractional(period=8)
    for y in _bursts(8.5, n=300):
        f.learn_one(y)
    assert f.offset == pytest.approx(0.5, abs=0.05)
    out = f.forecast(34)  # four periods of 8.5 ticks: the same phase again
    assert out[33] == pytest.approx(out[16], abs=15)  # 17 and 34 ticks ahead: two periods apart
    assert sum(out) == pytest.approx(4 * 2 * 300, rel=0.05)  # 2 s busy at 300 a period


def test_without_a_period_it_is_last_value():
    f = SeasonalFractional(period=1)
    for y in (5.0, 9.0, 2.0, 7.0, 7.0, 1.0):
        f.learn_one(y)
    assert f.offset == 0.0 and f.forecast(3) == [1.0, 1.0, 1.0]


def test_bad_parameters_say_which():
    with pytest.raises(ConfigError) as err:
        make_forecaster({"name": "seasonal_fractional", "period": 0})
    assert err.value.field == "forecaster.period"
    with pytest.raises(ConfigError) as err:
        make_forecaster({"name": "seasonal_fractional", "half_life": 0.5})
    assert err.value.field == "forecaster.half_life"


def test_selection_beats_seasonal_naive_on_a_sliding_burst():
    series = _bursts(8.3, n=400, noise=5.0)
    auto = AutoForecaster(loss="mae", horizon=1, scale=600, max_period=30)
    naive = SeasonalNaive(period=8)
    auto_mae, naive_mae = _mae(auto, series, warmup=150), _mae(naive, series, warmup=150)
    assert auto.period == 8
    err = auto.errors()
    assert err["seasonal_fractional"].mae < 0.8 * err["seasonal_naive"].mae
    assert auto.serving != "seasonal_naive"
    assert auto_mae < 0.8 * naive_mae, (auto_mae, naive_mae)


def test_the_median_counts_last_value_once_without_a_period():
    auto = AutoForecaster(loss="mae", scale=100)
    assert auto.period == 0
    combined = auto._distinct()
    assert "last_value" in combined
    assert "seasonal_naive" not in combined and "seasonal_fractional" not in combined
    for i in range(200):
        auto.learn_one(100.0 if i % 10 < 3 else 0.0)
    assert auto.period == 10 and "seasonal_fractional" in auto._distinct()


def test_the_module_examples_hold():
    import doctest

    from rswap_ebpf.predict import forecasters

    assert doctest.testmod(forecasters).failed == 0


def test_the_offset_waits_for_a_period_of_errors():
    f = SeasonalFractional(period=8, fit_after=2)
    series = _bursts(8.3, n=60)
    for i, y in enumerate(series):
        f.learn_one(y)
        if i < 8 + 2 * 8:  # a period of history, then two of one-step errors
            assert f.offset == 0.0
    assert f.offset == pytest.approx(0.3, abs=0.1)
    with pytest.raises(ConfigError) as err:
        make_forecaster({"name": "seasonal_fractional", "fit_after": -1})
    assert err.value.field == "forecaster.fit_after"
