"""Conformance of every forecaster we ship (the way river/checks runs over every estimator)."""
from __future__ import annotations

import copy
import math
import random

import pytest

from rswap_ebpf.predict.checkpoint import dumps, loads
from rswap_ebpf.errors import ConfigError
from rswap_ebpf.predict import forecasters as fc
from rswap_ebpf.predict import registry
from rswap_ebpf.predict.selection import AutoForecaster


def _series(n=160, period=8, seed=3):
    rnd = random.Random(seed)
    return [max(0.0, (900.0 if i % period < 3 else 40.0) + rnd.gauss(0, 30)) for i in range(n)]


ALL = registry.available()


@pytest.fixture(params=ALL)
def forecaster(request):
    return registry.make_forecaster(request.param, scale=1000)


def test_every_shipped_forecaster_is_checked():
    assert set(ALL) >= {"last_value", "seasonal_naive", "holt_winters", "snarimax",
                        "quantile_lags", "auto"}


def test_horizon_length_and_non_negative(forecaster):
    assert len(forecaster.forecast(3)) == 3  # before any sample
    for y in _series():
        forecaster.learn_one(y)
        out = forecaster.forecast(7)
        assert len(out) == 7
        assert all(math.isfinite(v) and v >= 0 for v in out)


def test_never_negative_on_a_falling_series(forecaster):
    for i in range(60):
        forecaster.learn_one(max(0.0, 600 - 15 * i))
    assert all(v >= 0 for v in forecaster.forecast(10))


def test_clone_is_fresh_and_same_parameters(forecaster):
    for y in _series(40):
        forecaster.learn_one(y)
    c = forecaster.clone()
    assert type(c) is type(forecaster)
    assert repr(c) == repr(forecaster.clone())
    fresh = c.forecast(3)
    assert fresh == type(forecaster).clone(forecaster).forecast(3)


def test_checkpoint_round_trip_keeps_forecasts(forecaster):
    data = _series(120)
    for y in data[:100]:
        forecaster.learn_one(y)
    copy_ = loads(dumps(forecaster))
    for y in data[100:]:
        forecaster.learn_one(y)
        copy_.learn_one(y)
    assert copy_.forecast(5) == pytest.approx(forecaster.forecast(5))


def test_learning_one_sample_at_a_time_is_deterministic(forecaster):
    twin = copy.deepcopy(forecaster)
    for y in _series(80):
        forecaster.learn_one(y)
    for y in _series(80):
        twin.learn_one(y)
    assert twin.forecast(4) == pytest.approx(forecaster.forecast(4))


def test_learns_something_from_a_level_shift(forecaster):
    for _ in range(400):
        forecaster.learn_one(500.0)
    # every model should end up near a constant it saw 400 times (SNARIMAX's SGD is the slowest)
    assert forecaster.forecast(1)[0] == pytest.approx(500.0, rel=0.35)


def test_quantile_lags_sits_above_the_median():
    rnd = random.Random(7)
    q = fc.QuantileLags(quantile=0.9)
    ys = [100 + rnd.gauss(0, 20) for _ in range(3000)]
    below = 0
    for i, y in enumerate(ys):
        if i > 1500 and y <= q.forecast(1)[0]:
            below += 1
        q.learn_one(y)
    share = below / (len(ys) - 1501)
    assert 0.75 <= share <= 0.98  # about 90% of the values fall under the 0.9 quantile


@pytest.mark.parametrize("spec,field", [
    ({"name": "quantile_lags", "quantile": 1.5}, "quantile"),
    ({"name": "auto", "loss": "rmse"}, "loss"),
    ({"name": "auto", "candidates": ["oracle"]}, "candidates"),
    ("nope", "forecaster"),
])
def test_bad_parameters_are_config_errors(spec, field):
    with pytest.raises(ConfigError) as e:
        registry.make_forecaster(spec)
    assert field in e.value.field


def test_default_forecaster_is_model_selection():
    assert isinstance(registry.make_forecaster(None), AutoForecaster)
