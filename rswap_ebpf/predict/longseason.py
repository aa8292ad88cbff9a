"""Seasons longer than the raw period search reaches: found on rolled-up buckets, followed by
models that read the season's phase from the kept ticks (or, past them, from the buckets).

:class:`LongPeriodDetector` runs :func:`~.period.detect` on each level's bucket means when that
level has closed a few more buckets (a level of 10-s buckets finds periods of 20 s to 30 min, the
hourly one up to a week), takes the level with the strongest autocorrelation, and refines a
period found there to whole ticks with the autocorrelation of the kept raw ticks at the lags
within a bucket of it.  A period replaces the current one only when found twice in a row (give or
take 2%), and a multiple of the current one keeps it (as :class:`~.period.PeriodDetector` does)
unless its autocorrelation is higher by more than 0.1: a week whose weekend differs from its
days is a better fit than the day.

:class:`LongSeason` forecasts tick ``t + h`` from the same phase a period before (the mean of
the last ``periods`` periods there), plus half the difference between the last bucket's worth of
ticks and the same ticks a period before: the long season's phase combined with where the recent
ticks are.

>>> from rswap_ebpf.predict.rollup import Rollups
>>> r = Rollups(tick_s=1.0, widths_s=(10.0, 60.0), capacity=(360, 240), raw_ticks=2048)
>>> d = LongPeriodDetector()
>>> for i in range(3000):
...     r.add(800.0 if i % 700 < 100 else 20.0)
...     p = d.update(r)
>>> p, round(d.confidence, 2) > 0.5
(700, True)
"""
from __future__ import annotations

import numpy as np

from rswap_ebpf.predict.forecasters import Base
from rswap_ebpf.predict.period import detect
from rswap_ebpf.predict.rollup import Rollups

#: a level is searched again after this many more of its buckets closed
EVERY = (6, 10, 6, 6)


class LongPeriodDetector:
    def __init__(self, min_ticks: int = 0, threshold: float = 0.3, every=EVERY):
        self.min_ticks = int(min_ticks)  # shorter periods are the raw detector's
        self.threshold = float(threshold)
        self.every = tuple(int(e) for e in every)
        self.period = 0  # ticks (0: none)
        self.confidence = 0.0  # autocorrelation of the bucket means at the period
        self.level = -1  # the level it was found on
        self._checked: list[int] = []
        self._found: dict[int, tuple[int, float]] = {}
        self._candidate = 0

    def update(self, r: Rollups) -> int:
        """After a sample was added to ``r``: the current period in ticks (0: none)."""
        if len(self._checked) != len(r.widths):
            self._checked = [0] * len(r.widths)
        searched = False
        for level, w in enumerate(r.widths):
            k = r.closed[level]
            every = self.every[min(level, len(self.every) - 1)]
            if k == self._checked[level] or k % every:
                continue
            self._checked[level] = k
            means = r.means(level)
            lo = max(2, -(-self.min_ticks // w) if self.min_ticks else 2)
            if len(means) < 2 * lo or len(means) < 8:
                continue
            b, strength = detect(list(means), lo, len(means) // 2, self.threshold)
            if b and b * w > self.min_ticks:
                self._found[level] = (b * w, strength)
            else:
                self._found.pop(level, None)
            searched = True
        if not searched:
            return self.period
        if self._found:
            level = max(self._found, key=lambda lv: (self._found[lv][1], -lv))
            found, strength = self._found[level]
            found = _refine(r, found, r.widths[level])
        else:
            level, found, strength = -1, 0, 0.0
        keep = False
        if found and self.period and _near_multiple(found, self.period) \
                and not _same(found, self.period):
            # a multiple of the current period: the same rhythm, kept unless it is clearly the
            # better fit (a week whose weekend differs from its days beats the day)
            cur = [st for p, st in self._found.values() if _same(p, self.period)]
            keep = bool(cur) and strength <= max(cur) + 0.1
            if keep:
                self.confidence = max(cur)
        if keep:
            pass
        elif _same(found, self._candidate) or _same(found, self.period):
            self.period, self.confidence, self.level = found, strength, level
        self._candidate = found
        return self.period


def _same(a: int, b: int) -> bool:
    return a == b or (a > 0 and b > 0 and abs(a - b) <= max(1, 0.02 * max(a, b)))


def _near_multiple(found: int, period: int) -> bool:
    k = round(found / period)
    return k >= 1 and abs(found - k * period) <= max(1, 0.02 * found)


def _refine(r: Rollups, period: int, width: int) -> int:
    """``period`` (a whole number of ``width``-tick buckets) to the lag within a bucket of it
    at which the kept raw ticks correlate best; as it is where they cover too little."""
    x = r.raw()
    n = len(x)
    if width <= 1 or n < period + width + max(period // 2, 2 * width):
        return period
    x = x - x.mean()
    lags = range(max(2, period - width), period + width + 1)
    best = max(lags, key=lambda lag: float(np.dot(x[:-lag], x[lag:])) / (n - lag))
    return int(best)


class LongSeason(Base):
    """The same phase ``period`` ticks before, from the shared :class:`Rollups` (its raw ticks
    where kept, else the finest bucket holding it), mean of the last ``periods`` periods, plus
    ``shrink`` x the recent ticks' difference from a period before.  The rollups are filled by
    the owner (:class:`~.selection.AutoForecaster`); ``learn_one`` only counts samples, so a
    model rebuilt over kept history reads no tick from its future."""

    name = "seasonal_long"

    def __init__(self, period: int = 0, periods: int = 1, rollups: Rollups | None = None,
                 start: int = 0, shrink: float = 0.5):
        self.period = int(period)
        self.periods = max(1, int(periods))
        self.rollups = rollups if rollups is not None else Rollups()
        self.shrink = float(shrink)
        self._n = int(start)  # samples learnt: the index of the next one
        self._last = 0.0

    def learn_one(self, y: float, x: dict | None = None) -> None:
        self._n += 1
        self._last = float(y)

    def _values(self, idx: np.ndarray) -> np.ndarray:
        """Samples ``idx`` as known when ``self._n`` samples are in: the raw ticks kept (one
        array lookup), else the finest closed bucket holding them; NaN where neither is."""
        r = self.rollups
        out = np.full(idx.shape, np.nan)
        known = (idx >= 0) & (idx < self._n)
        raw = known & (idx >= r.n - r.raw_ticks) & (idx < r.n)
        out[raw] = r._raw[idx[raw] % r.raw_ticks]
        for j in np.flatnonzero(known & ~raw):
            t = int(idx[j])
            for level, w in enumerate(r.widths):
                if (t // w + 1) * w <= self._n:
                    m = r.bucket_mean_at(level, t)
                    if m is not None:
                        out[j] = m
                        break
        return out

    def _season(self, idx: np.ndarray) -> np.ndarray:
        """The mean of the last ``periods`` periods at each of ``idx`` (NaN: none known)."""
        vals = np.stack([self._values(idx - k * self.period) for k in range(self.periods)])
        n = np.sum(~np.isnan(vals), axis=0)
        total = np.nansum(vals, axis=0)
        return np.where(n > 0, total / np.maximum(n, 1), np.nan)

    def forecast(self, horizon: int, xs: list[dict] | None = None) -> list[float]:
        p, n = self.period, self._n
        if p < 2 or n <= p:
            return [max(0.0, self._last)] * horizon
        m = min(self.rollups.widths[0], p - 1)
        recent = np.arange(n - m, n)
        now, before = self._values(recent), self._season(recent - p)
        offset = 0.0
        if not (np.isnan(now).any() or np.isnan(before).any()):
            offset = self.shrink * float(now.mean() - before.mean())
        season = self._season(np.arange(n - p, n - p + horizon))
        season = np.where(np.isnan(season), self._last, season) + offset
        return [max(0.0, float(v)) for v in season]
