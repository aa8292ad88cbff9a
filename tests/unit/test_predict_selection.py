from __future__ import annotations

import random

from rswap_ebpf.predict.period import PeriodDetector, detect
from rswap_ebpf.predict.profile import TaskProfiler
from rswap_ebpf.predict.forecasters import make_forecaster
from rswap_ebpf.predict.selection import AutoForecaster, pinball
from rswap_ebpf.resources import ResourceType

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
    assert pred.model in ("seasonal_naive", "holt_winters", "snarimax", "quantile_lags")
    assert pred.mae is not None and pred.loss is not None
    assert len(pred.series) == 5 and pred.peak == max(pred.series)
    assert min(pred.series) <= pred.quantile <= pred.peak
    assert pred.over_window("peak") == pred.peak
    assert pred.over_window(0.0) == min(pred.series)
