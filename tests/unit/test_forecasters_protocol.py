"""Every shipped forecaster follows the protocol: learn_one one sample, forecast(horizon)."""
import math

import pytest

from rswap_ebpf.predict.checkpoint import dumps, loads
from rswap_ebpf.errors import ConfigError
from rswap_ebpf.predict.registry import available, make_forecaster
from rswap_ebpf.predict.profile import TaskProfiler
from rswap_ebpf.model.resources import ResourceType

CPU = ResourceType.PROCESSOR_CYCLES
PERIODIC = [1500.0 if i % 10 < 3 else 50.0 for i in range(80)]


@pytest.mark.parametrize("name", available())
def test_protocol(name):
    f = make_forecaster(name, scale=2000)
    assert len(f.forecast(3)) == 3  # before any sample
    for y in PERIODIC:
        f.learn_one(y)
    out = f.forecast(7)
    assert len(out) == 7
    assert all(isinstance(v, float) and math.isfinite(v) and v >= 0 for v in out)
    clone = f.clone()
    assert clone.forecast(2) == [0.0, 0.0] or len(clone.forecast(2)) == 2
    restored = loads(dumps(f))
    assert restored.forecast(7) == pytest.approx(out)


def test_seasonal_models_see_the_burst_coming():
    for spec in ({"name": "seasonal_naive", "period": 10},
                 {"name": "holt_winters", "alpha": 0.3, "beta": 0.01, "gamma": 0.8, "seasonality": 10}):
        f = make_forecaster(spec, scale=2000)
        for y in PERIODIC[:78]:  # the next burst starts at i=80
            f.learn_one(y)
        ahead = f.forecast(4)
        assert max(ahead[2:]) > 1000, (spec, ahead)  # the burst, two ticks ahead
        assert ahead[0] < 500, (spec, ahead)


def test_bad_specs_name_the_field():
    with pytest.raises(ConfigError, match="unknown forecaster 'prophet'"):
        make_forecaster("prophet")
    with pytest.raises(ConfigError, match="bad parameters"):
        make_forecaster({"name": "holt_winters", "nonsense": 1})
    with pytest.raises(ConfigError, match=r"forecaster\.name"):
        make_forecaster({"alpha": 1})


def test_profiler_tracks_error_and_predicts():
    prof = TaskProfiler(lambda t, r: make_forecaster("last_value"))
    for y in (100, 200, 300):
        prof.update_prediction("a", CPU, y)
    pred = prof.get_predicted_needs("a", 5)[CPU]
    assert pred.peak == 300 and len(pred.series) == 5 and pred.model == "last_value"
    assert pred.mae == pytest.approx(100.0)
    ana = prof.analyze_task("a")[CPU]
    assert (ana.samples, ana.last, ana.mean, ana.peak) == (3, 300, 200, 300)


def test_broken_river_model_falls_back_instead_of_stopping_the_tick():
    f = make_forecaster("holt_winters", scale=1)

    class Boom:
        def learn_one(self, y):
            raise ZeroDivisionError("boom")

    f.model = Boom()
    f.learn_one(5.0)
    assert f.failed and f.forecast(2) == [5.0, 5.0]


def test_profile_sanitises_a_diverging_model():
    from rswap_ebpf.predict.profile import TaskProfile

    class Diverged:
        def learn_one(self, y, x=None):
            pass

        def forecast(self, horizon, xs=None):
            return [float("inf"), 2e27, -5.0, 300.0][:horizon]

    p = TaskProfile("a", CPU, Diverged())
    p.learn_one(100.0)
    # inf: the last sample; 2e27 and 300: at most 1.5 x the largest sample seen (+1)
    assert p.forecast(4) == [100.0, 151.0, 0.0, 151.0]
    p.learn_one(10.0)
    assert p.forecast(4) == [10.0, 151.0, 0.0, 151.0]  # the peak is remembered, not the last


def test_no_forecast_exceeds_the_pool_or_the_tasks_history():
    """Online selection with a pool of 2000 (its scale): on a task whose bursts reach 1400, no
    forecast goes above 1.5 x 1400 + 1, nor above the pool for a task that once used all of it."""
    from rswap_ebpf.predict.profile import TaskProfile
    from rswap_ebpf.predict.registry import make_forecaster

    p = TaskProfile("a", CPU, make_forecaster("auto", scale=2000))
    for i in range(300):
        p.learn_one(1400.0 if i % 12 < 4 else (60.0 if i % 2 else 0.0))
        assert max(p.forecast(8)) <= 1.5 * 1400 + 1
    q = TaskProfile("b", CPU, make_forecaster("auto", scale=2000))
    for i in range(100):
        q.learn_one(2000.0 if i % 5 == 0 else 100.0)
        assert max(q.forecast(8)) <= 2000
