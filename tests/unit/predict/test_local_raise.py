"""The raise from the errors of the nearest past forecasts (``neighbours``, round 8).

With the pinball loss a candidate's forecast is raised by the quantile of its own recent
errors.  Errors grow with what is forecast: over bursts of varying height, the idle ticks are
forecast exactly and the bursts are not.  One quantile over all errors then raises the idle
ticks by what the bursts missed (slack on every idle tick) and under-raises the bursts.  The
raise now comes from the ``neighbours`` past forecasts nearest in value to the one being raised.
"""
from __future__ import annotations

import random

import pytest

from rswap_ebpf.predict.checkpoint import dumps, loads
from rswap_ebpf.errors import ConfigError
from rswap_ebpf.predict.registry import make_forecaster
from rswap_ebpf.predict.selection import AutoForecaster


def _bursts(n: int, seed: int = 3, period: int = 8) -> list[float]:
    """2 ticks of a burst whose height is drawn afresh each period, then 6 idle ticks at 0."""
    rnd = random.Random(seed)
    out, height = [], 0.0
    for i in range(n):
        if i % period == 0:
            height = rnd.uniform(200.0, 800.0)
        out.append(height if i % period < 2 else 0.0)
    return out


def _fed(samples, **kw) -> AutoForecaster:
    a = AutoForecaster(candidates=("seasonal_naive", "last_value"), period=8, horizon=1,
                       quantile=0.9, floor=False, **kw)
    for y in samples:
        a.learn_one(y)
    return a


def test_idle_ticks_are_raised_by_what_idle_forecasts_missed_and_bursts_by_theirs():
    near, every = _fed(_bursts(300)), _fed(_bursts(300), neighbours=0)
    assert near.neighbours == 30 and every.neighbours == 0
    # seasonal-naive forecasts an idle tick at 0, and is never wrong there
    assert near._raise("seasonal_naive", [0.0])[0] == pytest.approx(0.0, abs=1e-6)
    # over all errors, a quarter of them are the bursts' (up to 600 short): 0.9 raises by them
    assert every._raise("seasonal_naive", [0.0])[0] > 100.0
    # a burst forecast, by contrast, is raised by the burst forecasts' own errors: more
    assert near._raise("seasonal_naive", [500.0])[0] > every._raise("seasonal_naive", [500.0])[0]


def test_the_local_raise_moves_the_headroom_from_idle_ticks_to_the_bursts():
    """Over the whole series, allocating the raised seasonal-naive forecast: the idle ticks'
    slack goes, the bursts get the headroom their own errors ask for, and in all the series is
    less short for less slack than with one quantile over all errors."""
    series = _bursts(400, seed=5)

    def cost(**kw):
        a = AutoForecaster(candidates=("seasonal_naive",), period=8, horizon=1, quantile=0.9,
                           floor=False, **kw)
        short = slack = idle = 0.0
        for i, y in enumerate(series):
            if i >= 100:
                f = a.forecast(1)[0]
                short, slack = short + max(0.0, y - f), slack + max(0.0, f - y)
                idle += f if y == 0 else 0.0
            a.learn_one(y)
        return short, slack, idle
    (s_near, l_near, i_near), (s_all, l_all, i_all) = cost(), cost(neighbours=0)
    assert i_all > 10_000 and i_near < 0.01 * i_all
    assert s_near < 0.5 * s_all and l_near < l_all


def test_past_forecasts_are_read_back_from_their_sample_and_residual():
    """Nothing more is stored: the forecast each residual was made from is ``y - r``."""
    a = AutoForecaster(candidates=("seasonal_naive",), period=8, horizon=1, floor=False,
                       scale=800.0)
    made = []
    for y in _bursts(200):
        if a._pending["seasonal_naive"]:
            made.append(a._pending["seasonal_naive"][-1][0][0])
        a.learn_one(y)
    res = list(a._resid["seasonal_naive"][0])
    hist = list(a._hist)[-len(res):]
    read_back = [y - r for y, r in zip(hist, res)]
    # residuals are kept at half precision of residual/scale: 3 significant digits
    assert read_back == pytest.approx(made[-len(res):], abs=0.5)


def test_a_rebuilt_model_is_raised_from_its_own_errors_at_the_right_samples():
    """When the period changes, the models are rebuilt and the kept history replayed through
    them, scoring as they go.  The raise made during that replay reads the samples its residuals
    belong to, so rebuilding over the same history gives back the same raised forecasts and the
    same losses (the losses score the raised forecasts of every replayed tick)."""
    a = AutoForecaster(candidates=("seasonal_naive", "last_value"), horizon=3, quantile=0.9,
                       period=8)
    for y in _bursts(200, seed=7):
        a.learn_one(y)
    pending = {n: list(d) for n, d in a._pending.items()}
    loss = dict(a._loss)
    a._build(a.candidates)
    assert {n: list(d) for n, d in a._pending.items()} == pending
    assert a._loss == pytest.approx(loss, rel=1e-12)
    assert not hasattr(a, "_replay_from")


def test_neighbours_is_checked_and_old_checkpoints_keep_the_raise_from_all_errors():
    for bad in (-1, 2.5, True, "30"):
        with pytest.raises(ConfigError, match="neighbours"):
            AutoForecaster(neighbours=bad)
    assert make_forecaster({"name": "auto", "neighbours": 0}).neighbours == 0
    a = _fed(_bursts(200))
    assert loads(dumps(a)).forecast(1) == a.forecast(1)
    state = loads(dumps(a)).__getstate__()
    del state["neighbours"]                           # a checkpoint from before round 8
    old = AutoForecaster.__new__(AutoForecaster)
    old.__setstate__(state)
    assert old.neighbours == 0


def test_every_step_at_once_gives_what_one_step_at_a_time_gives():
    """The raise is computed for all steps ahead in one go where they line up; the figures are
    the step-by-step ones (ties between equally near forecasts go to the most recent)."""
    rnd = random.Random(11)
    a = AutoForecaster(candidates=("seasonal_naive", "last_value", "median"), period=8,
                       horizon=4, quantile=0.8, scale=800.0)
    for i, y in enumerate(_bursts(260, seed=9)):
        a.learn_one(y + rnd.uniform(0.0, 5.0) * (i % 3 == 0))
        if i > 40 and i % 7 == 0:
            for name in a.candidates:
                point = [rnd.choice([0.0, 3.0, 400.0, rnd.uniform(0.0, 900.0)]) for _ in range(4)]
                fast = a._raise(name, point)
                slow = AutoForecaster._raise(_StepByStep(a), name, point)
                assert fast == slow
                if i > 110:  # every step's errors kept to the full 100: they line up
                    assert a._raise_near(name, point, a._at - len(a._hist)) is not None


class _StepByStep:
    """The forecaster, with the all-steps path turned off."""

    def __init__(self, a):
        self._a = a

    def __getattr__(self, attr):
        return getattr(self._a, attr)

    def _raise_near(self, *args):
        return None


def test_among_equally_near_forecasts_the_most_recent_count():
    """100 past forecasts, every one 1 away from the forecast being raised (5): the older 70
    missed by 4, the newest 30 by 6.  The 30 nearest are the newest, in both paths."""
    a = AutoForecaster(candidates=("last_value", "seasonal_naive"), horizon=1, quantile=0.5,
                       period=1, scale=100.0)
    a._hist.extend([10.0] * 100)
    a._at = 100
    a._resid["last_value"][0].extend([4.0] * 70 + [6.0] * 30)  # forecasts 6 and 4: 1 from 5
    assert a._raise("last_value", [5.0]) == [11.0]
    assert AutoForecaster._raise(_StepByStep(a), "last_value", [5.0]) == [11.0]
