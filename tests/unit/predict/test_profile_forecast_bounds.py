"""TaskProfile.forecast keeps a series that needs no clamp as it is: the same values (0.0 and
-0.0, ints and floats told apart) as clamping every value, on random series."""
from __future__ import annotations

import math
import random

from rswap_ebpf.predict.profile import TaskProfile


class Fixed:
    def __init__(self, values):
        self.values = values

    def learn_one(self, y, x=None):
        pass

    def forecast(self, horizon, xs=None):
        return list(self.values)


def _clamped(p: TaskProfile, raw):
    bound = p.bound()
    last = min(p.history[-1], bound)
    return [min(max(0.0, v), bound) if math.isfinite(v) else last for v in raw]


def test_forecast_is_the_clamped_series():
    rng = random.Random(7)
    odd = [0.0, -0.0, 1, 5, 2.5, 1e300, math.inf, -math.inf, math.nan, -3.0, 150.0, 151.0,
           1e308, 1e308]
    for _ in range(5000):
        raw = [rng.choice(odd) if rng.random() < 0.5 else rng.random() * 200
               for _ in range(rng.randint(1, 6))]
        p = TaskProfile("t", None, Fixed(raw))
        p.history.append(100.0)
        p.peak = 100.0
        assert [repr(v) for v in p.forecast(len(raw))] == [repr(v) for v in _clamped(p, raw)]
