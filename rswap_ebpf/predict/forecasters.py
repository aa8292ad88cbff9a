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
import struct
from collections import deque
from typing import Any, Protocol, runtime_checkable

from rswap_ebpf.errors import ConfigError
from rswap_ebpf.model.checks import check_fraction


_FLOAT32_MAX = 3.4028234663852886e38
_F32 = struct.Struct("<f")


def single(y: float) -> float:
    """``y`` to single precision (7 significant digits, far finer than any measurement).

    Profiles keep samples so, in memory as on disk, so a checkpoint stores each in 4 bytes and
    a restored profile holds exactly the values the running one held.
    """
    y = float(y)
    if y != y:
        return y
    return _F32.unpack(_F32.pack(min(max(y, -_FLOAT32_MAX), _FLOAT32_MAX)))[0]


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


class SeasonalLevel(Base):
    """The period's shape at the current burst's level.

    Seasonal-naive repeats the last period's heights; a burst that runs taller or shorter this
    time is missed for its whole length.  This scales the last period by where the series is
    now: inside a burst (the last value and the same phase a period ago both busy), the last
    value times how the last period went on from this phase, ``y[t] * y[t+h-p] / y[t-p]`` (that
    ratio at most ``max_ratio``); when idle now, the last period's next phase, ``y[t+h-p]`` (a
    burst's start, at last period's height); busy now where the last period was idle, the last
    value plus the last period's change.  So a burst ends when the last one did, and its height
    is the one it started with.  Without a period, or a period of history, the last value.
    """

    name = "seasonal_level"

    def __init__(self, period: int = 10, max_ratio: float = 3.0) -> None:
        if int(period) < 1:
            raise ConfigError("forecaster.period", "must be at least 1")
        if not float(max_ratio) >= 1.0:
            raise ConfigError("forecaster.max_ratio", "must be at least 1")
        self.period = int(period)
        self.max_ratio = float(max_ratio)
        self._window: deque[float] = deque(maxlen=self.period + 1)

    def learn_one(self, y: float, x: dict | None = None) -> None:
        self._window.append(float(y))

    def forecast(self, horizon: int, xs: list[dict] | None = None) -> list[float]:
        w, p = list(self._window), self.period
        if not w:
            return [0.0] * horizon
        now = w[-1]
        if p < 2 or len(w) <= p:
            return [max(0.0, now)] * horizon
        then = w[0]  # y[t-p]; w[h] is y[t+h-p]
        out = []
        for h in range(1, horizon + 1):
            nxt = w[(h - 1) % p + 1]
            if now > 0 and then > 0:
                f = now * min(self.max_ratio, nxt / then)
            elif now <= 0:
                f = nxt
            else:
                f = now + nxt - then
            out.append(max(0.0, f))
        return out


class SeasonalEWMA(Base):
    """A smoothed seasonal profile: per phase of the period, an exponential average of its values.

    Where burst heights are noisy, the last period (seasonal-naive) repeats its noise; averaging
    each phase over past periods (weight ``alpha`` on the newest) keeps the shape and drops the
    noise.  Until a full period is seen it repeats the last value.

    >>> s = SeasonalEWMA(period=3, alpha=0.5)
    >>> for y in (0, 0, 8, 0, 0, 4):
    ...     s.learn_one(y)
    >>> s.forecast(horizon=3)
    [0.0, 0.0, 6.0]
    """

    name = "seasonal_ewma"

    def __init__(self, period: int = 10, alpha: float = 0.3) -> None:
        if int(period) < 1:
            raise ConfigError("forecaster.period", "must be at least 1")
        if not 0.0 < float(alpha) <= 1.0:
            raise ConfigError("forecaster.alpha", "must be in (0, 1]")
        self.period = int(period)
        self.alpha = float(alpha)
        self._level: list[float | None] = [None] * self.period
        self._n = 0
        self._last = 0.0

    def learn_one(self, y: float, x: dict | None = None) -> None:
        y = float(y)
        i = self._n % self.period
        old = self._level[i]
        self._level[i] = y if old is None else (1.0 - self.alpha) * old + self.alpha * y
        self._n += 1
        self._last = y

    def forecast(self, horizon: int, xs: list[dict] | None = None) -> list[float]:
        if self._n < self.period:
            return [max(0.0, self._last)] * horizon
        return [max(0.0, self._level[(self._n + h) % self.period]) for h in range(horizon)]


class SeasonalFractional(Base):
    """Seasonal-naive for a period that is not a whole number of ticks.

    A job that runs, then sleeps (``fio ...; sleep 6``) repeats every run time + sleep time,
    rarely a whole number of 1 s ticks: its burst slides across tick edges by the fraction each
    period, and seasonal-naive, repeating lag ``period`` exactly, misses by that slide at both
    ends of every burst.  This model forecasts ``y[t + h - (period + offset)]``, read between
    the two samples around it (linear interpolation; past the newest sample, its own earlier
    forecasts), with ``offset`` in [-1, 1] fitted online by least squares on the one-step errors,
    exponentially weighted with a half-life of ``half_life`` samples (closed form: five running
    sums, O(1) a sample).  A period of whole ticks fits ``offset`` near 0: seasonal-naive again.
    The offset stays 0 until ``fit_after`` periods of one-step errors are in: fitted from part of
    a period, it sees one edge of a burst and not the other (and, as the first model selection
    scores after a new period, it lost the serving place to seasonal-naive for 100 ticks).

    >>> s = SeasonalFractional(period=4)
    >>> spikes = [0.0, 0.0, 0.0, 10.0] * 8
    >>> for y in spikes:
    ...     s.learn_one(y)
    >>> s.offset, s.forecast(4)
    (0.0, [0.0, 0.0, 0.0, 10.0])
    """

    name = "seasonal_fractional"

    def __init__(self, period: int = 10, half_life: float = 30.0, fit_after: float = 1.0) -> None:
        if int(period) < 1:
            raise ConfigError("forecaster.period", "must be at least 1")
        if not float(half_life) >= 1.0:
            raise ConfigError("forecaster.half_life", "must be at least 1 (samples)")
        if not float(fit_after) >= 0.0:
            raise ConfigError("forecaster.fit_after", "must be at least 0 (periods)")
        self.period = int(period)
        self.half_life = float(half_life)
        self.fit_after = float(fit_after)
        self._decay = 0.5 ** (1.0 / self.half_life)
        self._hist: deque[float] = deque(maxlen=self.period + 2)
        # decayed sums over one-step errors e = y - y[t-p], against the slides to lag p+1
        # (u = y[t-p-1] - y[t-p]) and to lag p-1 (l = y[t-p+1] - y[t-p]): ee, eu, uu, el, ll
        self._sums = [0.0] * 5
        self._fitted = 0
        self.offset = 0.0

    def learn_one(self, y: float, x: dict | None = None) -> None:
        y = float(y)
        h, p = self._hist, self.period
        if p >= 2 and len(h) >= p + 1:  # a period of one tick has no phase to slide
            a = h[-p]
            e, u = y - a, h[-p - 1] - a
            lo = h[-p + 1] - a
            d, s = self._decay, self._sums
            for i, v in enumerate((e * e, e * u, u * u, e * lo, lo * lo)):
                s[i] = d * s[i] + v
            self._fitted += 1
            if self._fitted >= self.fit_after * p:
                self.offset = self._fit()
        h.append(y)

    def _fit(self) -> float:
        ee, eu, uu, el, ll = self._sums
        best_sse, best = ee, 0.0
        for num, den, sign in ((eu, uu, 1.0), (el, ll, -1.0)):
            if den > 1e-12 * max(1.0, ee):
                f = min(1.0, max(0.0, num / den))
                sse = ee - 2.0 * f * num + f * f * den
                if sse < best_sse - 1e-9 * max(1.0, ee):
                    best_sse, best = sse, sign * f
        return best

    def forecast(self, horizon: int, xs: list[dict] | None = None) -> list[float]:
        h = list(self._hist)
        if not h:
            return [0.0] * horizon
        if len(h) < self.period + 2:
            return [max(0.0, h[-1])] * horizon
        lag, last = self.period + self.offset, len(h) - 1
        out = []
        for k in range(1, horizon + 1):
            s = last + k - lag  # where what comes k steps ahead was, one period back
            i = math.floor(s)
            w = s - i
            v = h[i] if w <= 0.0 else (1.0 - w) * h[i] + w * h[i + 1]
            h.append(v)
            out.append(max(0.0, v))
        return out


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
        c = type(self)(self.model.clone(), self.scale, self.warmup)
        c.name = self.name  # holt_winters / snarimax name the instance, not the class
        return c


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


class QuantileLags(Base):
    """Linear regression on lag features, trained with River's quantile (pinball) loss.

    It forecasts the ``quantile`` of the next values rather than their mean, so the headroom an
    allocation needs is learnt from how the series actually varies instead of being a fixed
    percentage.  One model per step ahead (direct multi-horizon); features are the last values,
    a recent mean and maximum, and, when ``period`` is known, the values at the same phase one
    and two periods back (with their neighbours, so a burst that starts a tick early or late is
    still covered).

    >>> q = QuantileLags(quantile=0.9, period=4)
    >>> for i in range(400):
    ...     q.learn_one(10.0 if i % 4 == 0 else 1.0)
    >>> [round(v) for v in q.forecast(4)]
    [10, 2, 1, 1]
    """

    name = "quantile_lags"

    def __init__(self, quantile: float = 0.9, period: int = 0, lags: int = 3,
                 max_horizon: int = 8, lr: float = 0.02) -> None:
        check_fraction(quantile, "forecaster.quantile")
        if int(period) < 0 or int(lags) < 1 or int(max_horizon) < 1 or float(lr) <= 0:
            raise ConfigError("forecaster", "period >= 0, lags >= 1, max_horizon >= 1, lr > 0")
        self.quantile = float(quantile)
        self.period = int(period)
        self.lags = int(lags)
        self.max_horizon = int(max_horizon)
        self.lr = float(lr)
        self._norm = 0.0  # running max of |y|: features and target stay in [0, 1]
        keep = max(self.lags, 8, 2 * self.period + 2) + self.max_horizon
        self._hist: deque[float] = deque(maxlen=keep)
        self._models: list[Any] = []
        # features computed at each of the last max_horizon steps, per step ahead
        self._pending: deque[list[dict]] = deque(maxlen=self.max_horizon)

    def _model(self, h: int):
        from river import linear_model, optim

        while len(self._models) < h:
            self._models.append(linear_model.LinearRegression(
                optimizer=optim.SGD(self.lr), loss=optim.losses.Quantile(self.quantile),
                intercept_lr=self.lr))
        return self._models[h - 1]

    def _features(self, h: int) -> dict[str, float]:
        hist = self._hist
        n = len(hist)
        x: dict[str, float] = {}
        for k in range(min(self.lags, n)):
            x[f"lag{k + 1}"] = hist[n - 1 - k]
        recent = [hist[i] for i in range(max(0, n - 8), n)]
        if recent:
            x["mean8"] = sum(recent) / len(recent)
            x["max8"] = max(recent)
        p = self.period
        if p >= 2:
            for k in (1, 2):
                back = k * p * ((h - 1) // p + 1) - h  # same phase, k periods before the target
                i = n - 1 - back
                if 0 <= i < n:
                    x[f"season{k}"] = hist[i]
                    x[f"season{k}_max"] = max(hist[j] for j in range(max(0, i - 1), min(n, i + 2)))
        return x

    def _renorm(self, y: float) -> None:
        """Grow the normaliser; a linear model's weights are scale-free, only intercepts move."""
        if y <= self._norm:
            return
        if self._norm > 0:
            r = y / self._norm
            self._hist = deque((v / r for v in self._hist), maxlen=self._hist.maxlen)
            for m in self._models:
                m.intercept /= r
            for step in self._pending:
                for feats in step:
                    for k in feats:
                        feats[k] /= r
        self._norm = y

    def learn_one(self, y: float, x: dict | None = None) -> None:
        y = abs(float(y))
        self._renorm(y)
        y = y / self._norm if self._norm else 0.0
        for h, feats in enumerate(reversed(self._pending), start=1):
            if h <= len(feats):
                self._model(h).learn_one(feats[h - 1], y)
        self._hist.append(y)
        self._pending.append([self._features(h) for h in range(1, self.max_horizon + 1)])

    def forecast(self, horizon: int, xs: list[dict] | None = None) -> list[float]:
        if not self._hist:
            return [0.0] * horizon
        out = []
        for h in range(1, horizon + 1):
            hh = min(h, self.max_horizon)
            v = self._model(hh).predict_one(self._features(h)) * self._norm
            out.append(max(0.0, v) if math.isfinite(v) else max(0.0, self._hist[-1] * self._norm))
        return out
