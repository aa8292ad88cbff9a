"""Forecasters: one small protocol, one sample at a time (River's time-series protocol).

Every forecaster has ``learn_one(y, x=None)`` and ``forecast(horizon) -> list[float]``, takes
its hyper-parameters only in ``__init__`` (stored under the same names, so it can be cloned and
pickled), and never forecasts a negative amount.

>>> f = LastValue()
>>> for y in (1.0, 2.0, 3.0):
...     f.learn_one(y)
>>> f.forecast(horizon=2)
[3.0, 3.0]
>>> s = SeasonalNaive(period=3)
>>> for y in (0, 0, 9, 0, 0, 9):
...     s.learn_one(y)
>>> s.forecast(horizon=4)
[0.0, 0.0, 9.0, 0.0]
"""
from __future__ import annotations

import copy
import math
from collections import deque
from typing import Any, Protocol, runtime_checkable

from ..errors import ConfigError


@runtime_checkable
class Forecaster(Protocol):
    def learn_one(self, y: float, x: dict | None = None) -> None: ...

    def forecast(self, horizon: int, xs: list[dict] | None = None) -> list[float]: ...


class Base:
    """Shared behaviour: parameters from ``__init__``, cloning, non-negative forecasts."""

    name = "base"

    def _get_params(self) -> dict[str, Any]:
        import inspect

        sig = inspect.signature(type(self).__init__)
        return {p: getattr(self, p) for p in sig.parameters if p != "self"}

    def clone(self):
        return type(self)(**copy.deepcopy(self._get_params()))

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self._get_params().items())
        return f"{type(self).__name__}({params})"


class LastValue(Base):
    """Tomorrow looks like today: the baseline every other model must beat."""

    name = "last_value"

    def __init__(self) -> None:
        self._last = 0.0

    def learn_one(self, y: float, x: dict | None = None) -> None:
        self._last = float(y)

    def forecast(self, horizon: int, xs: list[dict] | None = None) -> list[float]:
        return [max(0.0, self._last)] * horizon


class SeasonalNaive(Base):
    """Repeat the last period: right for cron-like bursts, and cheap."""

    name = "seasonal_naive"

    def __init__(self, period: int = 10) -> None:
        if int(period) < 1:
            raise ConfigError("forecaster.period", "must be at least 1")
        self.period = int(period)
        self._window: deque[float] = deque(maxlen=self.period)

    def learn_one(self, y: float, x: dict | None = None) -> None:
        self._window.append(float(y))

    def forecast(self, horizon: int, xs: list[dict] | None = None) -> list[float]:
        if not self._window:
            return [0.0] * horizon
        w = list(self._window)
        if len(w) < self.period:
            return [max(0.0, w[-1])] * horizon
        return [max(0.0, w[h % self.period]) for h in range(horizon)]


class RiverForecaster(Base):
    """A River time-series model, scaled to ~[0, 1], with last-value until it has warmed up.

    River's models are numerically happiest near unit scale, so samples are divided by ``scale``
    (e.g. the pool total) before learning.  A model that returns NaN or infinities falls back to
    the last value for that forecast rather than poisoning an allocation.
    """

    name = "river"

    def __init__(self, model: Any, scale: float = 1.0, warmup: int = 0) -> None:
        self.model = model
        self.scale = float(scale) or 1.0
        self.warmup = int(warmup)
        self._n = 0
        self._last = 0.0
        self.failed = ""

    def learn_one(self, y: float, x: dict | None = None) -> None:
        y = float(y)
        self._last = y
        self._n += 1
        if self.failed:
            return
        try:
            self.model.learn_one(y / self.scale)
        except (ArithmeticError, ValueError, TypeError, IndexError) as err:
            # A model that breaks must not stop the tick: serve last-value from now on.
            self.failed = f"{type(err).__name__}: {err}"

    def forecast(self, horizon: int, xs: list[dict] | None = None) -> list[float]:
        if self._n < max(1, self.warmup) or self.failed:
            return [max(0.0, self._last)] * horizon
        try:
            raw = self.model.forecast(horizon=horizon)
        except (ArithmeticError, ValueError, TypeError, IndexError):
            return [max(0.0, self._last)] * horizon
        out = []
        for v in raw:
            v = float(v) * self.scale
            out.append(max(0.0, v) if math.isfinite(v) else max(0.0, self._last))
        return out

    def clone(self):
        return type(self)(self.model.clone(), self.scale, self.warmup)


def holt_winters(alpha: float = 0.5, beta: float = 0.05, gamma: float = 0.5,
                 seasonality: int = 0, scale: float = 1.0) -> RiverForecaster:
    """Level, trend and (with ``seasonality`` > 0) a period; River's ``HoltWinters``."""
    from river import time_series

    beta = beta or 1e-3  # River's seasonal update needs a trend component
    if seasonality:
        model = time_series.HoltWinters(alpha=alpha, beta=beta, gamma=gamma,
                                        seasonality=int(seasonality))
        warmup = 2 * int(seasonality)
    else:
        model = time_series.HoltWinters(alpha=alpha, beta=beta)
        warmup = 2
    f = RiverForecaster(model, scale=scale, warmup=warmup)
    f.name = "holt_winters"
    return f


def snarimax(p: int = 2, d: int = 0, q: int = 1, m: int = 1, sp: int = 0, sd: int = 0,
             sq: int = 0, scale: float = 1.0) -> RiverForecaster:
    """River's ``SNARIMAX``: (seasonal) ARIMA learnt online."""
    from river import time_series

    model = time_series.SNARIMAX(p=p, d=d, q=q, m=m, sp=sp, sd=sd, sq=sq)
    f = RiverForecaster(model, scale=scale, warmup=max(p, q, m * max(sp, sq, 1)) + d + 1)
    f.name = "snarimax"
    return f


_FACTORIES = {
    "last_value": LastValue,
    "seasonal_naive": SeasonalNaive,
    "holt_winters": holt_winters,
    "snarimax": snarimax,
}


def available() -> list[str]:
    return sorted(_FACTORIES)


def make_forecaster(spec: str | dict | None, scale: float = 1.0, field: str = "forecaster"):
    """Build a forecaster from configuration: a name, or a table with ``name`` and parameters."""
    if spec is None:
        spec = "holt_winters"
    if isinstance(spec, str):
        name, params = spec, {}
    elif isinstance(spec, dict):
        params = dict(spec)
        name = params.pop("name", None)
        if not isinstance(name, str):
            raise ConfigError(f"{field}.name", "missing (one of: " + ", ".join(available()) + ")")
    else:
        raise ConfigError(field, f"expected a name or a table, got {spec!r}")
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ConfigError(field, f"unknown forecaster {name!r} (known: {', '.join(available())})")
    if factory in (holt_winters, snarimax):
        params.setdefault("scale", scale)
    try:
        return factory(**params)
    except TypeError as err:
        raise ConfigError(field, f"bad parameters for {name}: {err}") from None
    except ValueError as err:
        raise ConfigError(field, f"bad parameters for {name}: {err}") from None
