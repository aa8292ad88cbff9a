from __future__ import annotations

import random

import pytest

from rswap_ebpf.predict.period import PeriodDetector, detect
from rswap_ebpf.predict.profile import TaskProfiler
from rswap_ebpf.predict.registry import make_forecaster
from rswap_ebpf.errors import ConfigError
from rswap_ebpf.predict.candidates import pinball
from rswap_ebpf.predict.selection import AutoForecaster
from rswap_ebpf.model.resources import ResourceType

CPU = ResourceType.PROCESSOR_CYCLES


def _bursty(n, period=12, busy=4, seed=1, hi=1500.0, lo=50.0, noise=60.0):
    rnd = random.Random(seed)
    return [max(0.0, (hi if i % period < busy else lo) + rnd.gauss(0, noise)) for i in range(n)]


def test_period_found_in_noisy_bursts():
    d = PeriodDetector(max_period=60)
    for y in _bursty(300, period=12):
        d.update(y)
    assert d.period == 12
    assert d.strength > 0.5


def test_no_period_in_noise_or_flat():
    rnd = random.Random(2)
    assert detect([rnd.random() for _ in range(400)])[0] == 0
    assert detect([5.0] * 400) == (0, 0.0)


def test_period_not_reported_as_a_multiple():
    assert detect(_bursty(400, period=7, busy=2, noise=5.0), max_period=60)[0] == 7


def test_period_change_is_followed():
    d = PeriodDetector(max_period=40, window=120)
    for y in _bursty(240, period=10) + _bursty(300, period=16, seed=5):
        d.update(y)
    assert d.period == 16


def test_pinball_penalises_shortfall_more():
    assert pinball(10, 5, 0.9) > pinball(5, 10, 0.9)


def test_selection_prefers_seasonal_models_on_periodic_bursts():
    a = AutoForecaster(scale=2000, loss="mae")
    for y in _bursty(300):
        a.learn_one(y)
    assert a.period == 12
    assert a.serving != "last_value"
    errs = a.errors()
    assert errs[a.serving].loss <= min(e.loss for e in errs.values() if e.loss is not None) * 1.06
    assert errs["last_value"].mae > 2 * errs[a.serving].mae


def test_selection_prefers_last_value_on_a_random_walk():
    rnd = random.Random(4)
    a = AutoForecaster(candidates=("last_value", "seasonal_naive"), loss="mae", period=9)
    y = 500.0
    for _ in range(400):
        y = max(0.0, y + rnd.gauss(0, 40))
        a.learn_one(y)
    assert a.serving == "last_value"


def test_predicted_needs_name_the_serving_model_and_error():
    p = TaskProfiler(lambda t, r: make_forecaster("auto", scale=2000))
    for y in _bursty(200):
        p.update_prediction("web", CPU, y)
    pred = p.get_predicted_needs("web", 5)[CPU]
    assert pred.model == p.profiles[("web", CPU)].forecaster.serving
    assert pred.model in ("seasonal_naive", "seasonal_ewma", "holt_winters", "snarimax",
                          "quantile_lags", "median")
    assert pred.mae is not None and pred.loss is not None
    assert len(pred.series) == 5 and pred.peak == max(pred.series)
    assert min(pred.series) <= pred.quantile <= pred.peak
    assert pred.over_window("peak") == pred.peak
    assert pred.over_window(0.0) == min(pred.series)


def test_median_candidate_is_the_median_of_the_others():
    a = AutoForecaster(candidates=("last_value", "seasonal_naive", "seasonal_ewma", "median"),
                       loss="mae", period=6, horizon=3)
    for y in _bursty(60):
        a.learn_one(y)
    per_model = [a._models[n].forecast(3) for n in ("last_value", "seasonal_naive",
                                                     "seasonal_ewma")]
    assert a._point("median", 3) == [sorted(step)[1] for step in zip(*per_model)]
    with pytest.raises(ConfigError, match="median"):
        AutoForecaster(candidates=("last_value", "median"))


def test_recent_error_is_not_seeded_by_the_first_sample():
    """One cold-start error of 1000 followed by 150 errors of 10: the weighted mean is near 10
    (seeding the average with the first sample left it at 134)."""
    a = AutoForecaster(candidates=("last_value",), half_life=50)
    for e in [1000.0] + [10.0] * 150:
        v = a._ewm(("loss", "x"), e)
    assert 10 < v < 15


def test_seasonal_raise_uses_the_errors_at_that_phase():
    """Errors only in the burst phase raise the burst forecast, not the idle ticks (the raise
    from all errors, neighbours=0, does raise them)."""
    def run(seasonal_raise):
        a = AutoForecaster(candidates=("last_value", "seasonal_naive"), period=8,
                           quantile=0.95, seasonal_raise=seasonal_raise, horizon=1,
                           neighbours=0)
        rnd = random.Random(2)
        for i in range(300):
            a.learn_one((1000.0 + rnd.uniform(-300, 300)) if i % 8 == 0 else 50.0)
        return a
    a = run(True)
    assert a.period == 8 and a._at % 8 == 4          # next tick is idle, 4 from a burst
    idle_raised = a._raise("seasonal_naive", [50.0])[0]
    assert idle_raised == pytest.approx(50.0, abs=1)
    b = run(False)
    assert b._raise("seasonal_naive", [50.0])[0] > idle_raised + 50


def test_blend_weights_models_by_their_recent_error_at_that_step():
    """The blend lies between its models and nearer the one with the smaller recent error."""
    a = AutoForecaster(candidates=("last_value", "seasonal_naive", "blend"), loss="mae",
                       period=6, horizon=2)
    for y in _bursty(120, period=6, busy=2):
        a.learn_one(y)
    lv, sn = a._models["last_value"].forecast(2), a._models["seasonal_naive"].forecast(2)
    blend = a._point("blend", 2)
    for h in range(2):
        lo, hi = sorted((lv[h], sn[h]))
        assert lo <= blend[h] <= hi
        e_lv = a._step_err["last_value"][h][0] / a._step_err["last_value"][h][1]
        e_sn = a._step_err["seasonal_naive"][h][0] / a._step_err["seasonal_naive"][h][1]
        assert e_sn < e_lv  # seasonal-naive is the better model on periodic bursts...
        if abs(sn[h] - lv[h]) > 1:  # ...so the blend sits nearer to it
            assert abs(blend[h] - sn[h]) < abs(blend[h] - lv[h])
    with pytest.raises(ConfigError, match="blend"):
        AutoForecaster(candidates=("last_value", "blend"))


def test_a_random_walk_has_no_period():
    """A wandering series has high autocorrelation at every lag; a bump in it is not a period
    (Bartlett's band), while real bursts of the same length are still found."""
    rnd = random.Random(7)
    found = []
    for seed in range(5):
        rnd = random.Random(seed)
        walk, y = [], 250.0
        for _ in range(150):
            y = max(0.0, y + rnd.gauss(0, 60))
            walk.append(y)
        found.append(detect(walk, max_period=60)[0])
    assert found == [0] * 5
    assert detect(_bursty(150, period=12), max_period=60)[0] == 12


def test_one_outlier_does_not_hide_a_period():
    """The daemon's first tick is uncapped: a burst seen once at full height (2,000 millicores),
    then the same task throttled into a small rhythm.  The outlier holds most of the variance,
    so the autocorrelation of the samples shows nothing; that of their ranks shows the rhythm,
    and a selection that learns from these samples gets it (and its seasonal models)."""
    rhythm = [20.0, 40.0, 80.0, 160.0] + [0.0] * 6
    samples = [1600.0, 2000.0, 80.0] + rhythm * 14
    assert detect(samples, max_period=60)[0] == 10
    auto = AutoForecaster(loss="mae", horizon=1, scale=2000, max_period=120)
    for y in samples:
        auto.learn_one(y)
    assert auto.period == 10
    assert auto.forecast(4) == pytest.approx(rhythm[:4], abs=5)  # the next burst's climb
    # no outlier: the samples' own autocorrelation decides, as before
    assert detect(rhythm * 14, max_period=60)[0] == 10



def test_the_allocation_floor_covers_what_it_covers():
    """The manager never allocates below the last observed use, so demand that stays under it
    is never short, however low the forecast was: scored with the floor, such a tick leaves no
    positive residual, and the raise (the headroom) only pays for what the floor leaves open."""
    series = [100.0 if i % 2 == 0 else 50.0 + 20.0 * ((i // 2) % 2) for i in range(200)]

    def run(floor):
        a = AutoForecaster(candidates=("seasonal_naive",), period=2, horizon=1, quantile=0.9,
                           floor=floor, neighbours=0)  # the raise from all errors: highs too
        for y in series:
            a.learn_one(y)
        return a
    a, b = run(True), run(False)
    # the lows alternate 50, 70: seasonal-naive is 20 short on every other low, but the floor
    # (the 100 just before) covers it
    assert max(b._resid["seasonal_naive"][0]) == pytest.approx(20.0)
    assert max(a._resid["seasonal_naive"][0]) == pytest.approx(0.0)
    assert a._at % 2 == 0  # next is a high: no raise needed with the floor, 20 without
    assert a.forecast(1)[0] == pytest.approx(100.0)
    assert b.forecast(1)[0] > 110.0
