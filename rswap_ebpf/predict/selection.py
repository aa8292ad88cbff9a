"""Online model selection: every candidate learns, the one with the lowest recent error serves.

The error that counts is the one allocation pays for.  With ``loss="pinball"`` (the default) a
forecast below the demand costs ``quantile`` per unit and one above it ``1 - quantile``: a
shortfall starves the task, slack only wastes units, so with ``quantile=0.9`` running short is
nine times worse than holding too much.  ``loss="mae"`` ranks by plain accuracy.  Each candidate's
forecasts for every step of ``horizon`` are scored when the value they were about arrives, and the
scores are averaged with an exponential decay of ``half_life`` samples.

With the pinball loss the forecaster serves an upper quantile, and the headroom comes from the
data: every candidate's point forecast is raised by the ``quantile`` of its own recent errors at
that step ahead (split-conformal style, over the last ``calibration`` samples), and candidates are
ranked on those raised forecasts.  With ``loss="mae"`` the point forecasts serve as they are.

Seasonal candidates get the period found online by :class:`~.period.PeriodDetector`; when it
changes they are rebuilt and replayed over the kept history, so nothing starts cold.

>>> a = AutoForecaster(candidates=("last_value", "seasonal_naive"), loss="mae", max_period=20)
>>> for i in range(120):
...     a.learn_one(10.0 if i % 6 == 0 else 1.0)
>>> a.period, a.serving
(6, 'seasonal_naive')
>>> a.forecast(6)
[10.0, 1.0, 1.0, 1.0, 1.0, 1.0]
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from ..errors import ConfigError
from .forecasters import Base, LastValue, QuantileLags, SeasonalNaive, holt_winters, snarimax
from .period import PeriodDetector

CANDIDATES = ("last_value", "seasonal_naive", "holt_winters", "snarimax", "quantile_lags")
LOSSES = ("pinball", "mae")


@dataclass(frozen=True)
class CandidateError:
    """A candidate's recent errors: the selection loss and the 1-step MAE, over ``samples``."""

    model: str
    loss: float | None
    mae: float | None
    samples: int


def pinball(y: float, f: float, q: float) -> float:
    return q * (y - f) if y >= f else (1.0 - q) * (f - y)


class AutoForecaster(Base):
    name = "auto"

    def __init__(self, candidates: tuple[str, ...] | list[str] = CANDIDATES, loss: str = "pinball",
                 quantile: float = 0.9, horizon: int = 5, half_life: float = 50.0,
                 scale: float = 1.0, max_period: int = 120, period: int = 0,
                 history: int = 600, min_scored: int = 10, hysteresis: float = 0.05,
                 calibration: int = 100):
        unknown = [c for c in candidates if c not in CANDIDATES]
        if unknown or not candidates:
            raise ConfigError("forecaster.candidates",
                              f"unknown {unknown} (known: {', '.join(CANDIDATES)})")
        if loss not in LOSSES:
            raise ConfigError("forecaster.loss", f"{loss!r} is not one of {', '.join(LOSSES)}")
        if not 0.0 < float(quantile) < 1.0:
            raise ConfigError("forecaster.quantile", "must be between 0 and 1 (exclusive)")
        self.candidates = tuple(candidates)
        self.loss = loss
        self.quantile = float(quantile)
        self.horizon = max(1, int(horizon))
        self.half_life = float(half_life)
        self.scale = float(scale) or 1.0
        self.max_period = int(max_period)
        self.period = int(period)
        self.history = max(int(history), 4 * self.max_period)
        self.min_scored = int(min_scored)
        self.hysteresis = float(hysteresis)
        self.calibration = max(5, int(calibration))
        self._decay = 0.5 ** (1.0 / max(1.0, self.half_life))
        self._fixed_period = self.period > 0
        self._detector = PeriodDetector(max_period=self.max_period, every=3)
        self._hist: deque[float] = deque(maxlen=self.history)
        self._models: dict[str, Base] = {}
        self._pending: dict[str, deque[tuple[list[float], list[float]]]] = {}
        self._resid: dict[str, list[deque[float]]] = {}
        self._loss: dict[str, float] = {}
        self._mae: dict[str, float] = {}
        self._scored: dict[str, int] = {}
        self.serving = self.candidates[0]
        self._build(self.candidates)

    # -- candidates ----------------------------------------------------------------------------
    def _make(self, name: str) -> Base:
        p = self.period
        if name == "last_value":
            return LastValue()
        if name == "seasonal_naive":
            return SeasonalNaive(period=max(1, p))
        if name == "holt_winters":
            if p >= 2:
                return holt_winters(alpha=0.3, beta=0.01, gamma=0.5, seasonality=p,
                                    scale=self.scale)
            return holt_winters(alpha=0.5, beta=0.05, scale=self.scale)
        if name == "snarimax":
            if p >= 2:
                return snarimax(p=2, d=0, q=1, m=p, sp=1, scale=self.scale)
            return snarimax(p=2, d=0, q=1, scale=self.scale)
        # for MAE the right quantile is the median
        q = self.quantile if self.loss == "pinball" else 0.5
        return QuantileLags(quantile=q, period=p, max_horizon=max(8, self.horizon))

    def _build(self, names) -> None:
        """(Re)build candidates and replay the kept history through them, scoring as they go,
        so a model rebuilt for a new period competes on its record, not from zero."""
        for name in names:
            self._models[name] = m = self._make(name)
            self._pending[name] = deque(maxlen=self.horizon)
            self._resid[name] = [deque(maxlen=self.calibration) for _ in range(self.horizon)]
            for key in (self._loss, self._mae, self._scored):
                key.pop(name, None)
            for y in self._hist:
                self._score(name, y)
                m.learn_one(y)
                self._push(name)

    def _score(self, name: str, y: float) -> None:
        total, n = 0.0, 0
        for age, (point, upper) in enumerate(reversed(self._pending[name]), start=1):
            f = point[age - 1]
            self._resid[name][age - 1].append(y - f)
            total += pinball(y, upper[age - 1], self.quantile) if self.loss == "pinball" \
                else abs(y - f)
            n += 1
            if age == 1:
                err = abs(y - f)
                old = self._mae.get(name)
                self._mae[name] = err if old is None else self._decay * old + (1 - self._decay) * err
        if n:
            sample = total / n
            old = self._loss.get(name)
            self._loss[name] = sample if old is None else self._decay * old + (1 - self._decay) * sample
            self._scored[name] = self._scored.get(name, 0) + 1

    def _push(self, name: str) -> None:
        point = self._models[name].forecast(self.horizon)
        self._pending[name].append((point, self._raise(name, point)))

    # -- protocol ------------------------------------------------------------------------------
    def learn_one(self, y: float, x: dict | None = None) -> None:
        y = float(y)
        for name in self._models:
            self._score(name, y)
        self._hist.append(y)
        for m in self._models.values():
            m.learn_one(y)
        rebuilt: list[str] = []
        if not self._fixed_period:
            p = self._detector.update(y)
            if p != self.period:
                self.period = p
                rebuilt = [c for c in self.candidates if c != "last_value"]
                self._build(rebuilt)  # replays the history, y included
        for name in self._models:
            if name not in rebuilt:
                self._push(name)
        self._choose()

    def _raise(self, name: str, point: list[float]) -> list[float]:
        """With the pinball loss: the point forecast plus the quantile of this model's errors."""
        if self.loss != "pinball":
            return point
        out = []
        for h, f in enumerate(point):
            res = self._resid[name][min(h, self.horizon - 1)]
            if len(res) >= 5:
                xs = sorted(res)
                f = f + xs[min(len(xs) - 1, int(self.quantile * len(xs)))]
            out.append(max(0.0, f))
        return out

    def _choose(self) -> None:
        ready = {n: l for n, l in self._loss.items() if self._scored.get(n, 0) >= self.min_scored}
        if not ready:
            return
        best = min(ready, key=ready.get)
        cur = ready.get(self.serving)
        if cur is None or ready[best] < (1.0 - self.hysteresis) * cur:
            self.serving = best

    def forecast(self, horizon: int, xs: list[dict] | None = None) -> list[float]:
        pend = self._pending.get(self.serving)
        if pend and horizon <= self.horizon:
            return list(pend[-1][1][:horizon])
        return self._raise(self.serving, self._models[self.serving].forecast(horizon))

    def point_forecast(self, horizon: int) -> list[float]:
        """The serving model's own forecast, before any raise to the quantile."""
        return self._models[self.serving].forecast(horizon)

    # -- reporting -----------------------------------------------------------------------------
    def errors(self) -> dict[str, CandidateError]:
        return {n: CandidateError(n, self._loss.get(n), self._mae.get(n), self._scored.get(n, 0))
                for n in self.candidates}

    @property
    def serving_loss(self) -> float | None:
        return self._loss.get(self.serving)

    @property
    def serving_mae(self) -> float | None:
        v = self._mae.get(self.serving)
        return v if v is None or math.isfinite(v) else None
