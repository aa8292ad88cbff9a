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


def _fed(f, series=PERIODIC):
    for y in series:
        assert f.learn_one(y) is None
    return f


def _valid(out, horizon):
    return len(out) == horizon and all(isinstance(v, float) and math.isfinite(v) and v >= 0
                                       for v in out)


# The conformance suite every registered forecaster must pass (as river.checks runs over every
# estimator): one sample at a time, forecasts of the asked length, finite and non-negative,
# hyper-parameters only from __init__ (so clone() rebuilds it), and no hidden randomness.
FORECASTERS = available()


@pytest.mark.parametrize("name", FORECASTERS)
def test_forecast_has_the_horizon_asked_before_and_after_learning(name):
    f = make_forecaster(name, scale=2000)
    assert _valid(f.forecast(3), 3) and _valid(f.forecast(1), 1)
    _fed(f)
    for h in (1, 7, 12):
        assert _valid(f.forecast(h), h), (h, f.forecast(h))


@pytest.mark.parametrize("name", FORECASTERS)
def test_learn_one_takes_x_as_river_does(name):
    f = make_forecaster(name, scale=2000)
    f.learn_one(10.0, x=None)
    f.learn_one(12.0, {})
    assert _valid(f.forecast(2, xs=None), 2)


@pytest.mark.parametrize("name", FORECASTERS)
@pytest.mark.parametrize("series", [[0.0] * 60, [5.0] * 59 + [1e9], [1e-9, 1e6] * 40],
                         ids=["idle", "spike", "alternating"])
def test_odd_inputs_still_give_finite_non_negative_forecasts(name, series):
    assert _valid(_fed(make_forecaster(name, scale=2000), series).forecast(5), 5)


@pytest.mark.parametrize("name", FORECASTERS)
def test_same_input_same_forecast(name):
    a = _fed(make_forecaster(name, scale=2000))
    b = _fed(make_forecaster(name, scale=2000))
    assert a.forecast(7) == b.forecast(7)


@pytest.mark.parametrize("name", FORECASTERS)
def test_clone_is_the_same_model_untrained(name):
    f = _fed(make_forecaster(name, scale=2000))
    trained = f.forecast(7)
    clone = f.clone()
    assert type(clone) is type(f) and clone.name == f.name and clone is not f
    assert clone.forecast(3) == make_forecaster(name, scale=2000).forecast(3)  # learnt nothing
    assert _fed(clone).forecast(7) == trained  # same hyper-parameters: same model
    _fed(clone, [1e6] * 30)
    assert f.forecast(7) == trained  # no state shared with the original


@pytest.mark.parametrize("name", [n for n in FORECASTERS if n not in ("holt_winters", "snarimax")])
def test_hyper_parameters_are_stored_under_their_names(name):
    """River's rule: every ``__init__`` argument is an attribute of the same name (what clone
    and repr read); holt_winters and snarimax are factories around River's own models."""
    import inspect

    f = make_forecaster(name, scale=2000)
    params = [p for p in inspect.signature(type(f).__init__).parameters if p != "self"]
    assert all(hasattr(f, p) for p in params), [p for p in params if not hasattr(f, p)]
    assert repr(f).startswith(type(f).__name__ + "(")


@pytest.mark.parametrize("name", FORECASTERS)
def test_a_checkpoint_restores_the_same_forecast(name):
    f = _fed(make_forecaster(name, scale=2000))
    restored = loads(dumps(f))
    assert restored.forecast(7) == pytest.approx(f.forecast(7))


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
