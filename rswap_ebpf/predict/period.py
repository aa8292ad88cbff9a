"""Online period detection: find the period of bursts that repeat (cron-like jobs, periodic batches).

The autocorrelation of the recent samples is recomputed every ``every`` samples; the period is the
first autocorrelation peak that is nearly as high as the highest one (so a period of 12 is not
reported as 24) and above Bartlett's significance band (so a random walk's wandering is not
taken for a period), and it must be found twice in a row before it replaces the current one, so one
noisy window does not rebuild every seasonal model.

>>> d = PeriodDetector(max_period=30)
>>> for i in range(200):
...     _ = d.update(5.0 if i % 7 < 2 else 0.0)
>>> d.period
7
"""
from __future__ import annotations

from collections import deque

import numpy as np


class PeriodDetector:
    def __init__(self, max_period: int = 120, min_period: int = 2, every: int = 10,
                 threshold: float = 0.3, window: int = 0):
        self.max_period = int(max_period)
        self.min_period = max(2, int(min_period))
        self.every = max(1, int(every))
        self.threshold = float(threshold)
        self.window = int(window) or 4 * self.max_period
        self.period = 0
        self.strength = 0.0  # autocorrelation at the current period
        self._buf: deque[float] = deque(maxlen=self.window)
        self._n = 0
        self._candidate = 0

    def update(self, y: float) -> int:
        """Add one sample; return the current period (0: none found)."""
        self._buf.append(float(y))
        self._n += 1
        if self._n % self.every == 0:
            found, strength = detect(list(self._buf), self.min_period, self.max_period,
                                     self.threshold)
            if found and self.period and found % self.period == 0:
                # a multiple of the period we have: same rhythm, keep the models
                self.strength = strength
                found = self.period
            elif found == self.period:
                self.strength = strength
            elif found and found == self._candidate or (found == 0 and self._candidate == 0):
                self.period, self.strength = found, strength
            self._candidate = found
        return self.period


def detect(samples: list[float], min_period: int = 2, max_period: int = 120,
           threshold: float = 0.3) -> tuple[int, float]:
    """(period, autocorrelation) of ``samples``, or (0, 0.0) when nothing repeats clearly.

    Needs at least two full periods; a flat series has no period.  Where the samples show none,
    their ranks are tried: one outlier can hold most of a window's variance and hide the period
    of everything else (a burst the first, uncapped tick saw at full height, then bursts
    throttled to a small rhythm), and ranks give it no more weight than the largest of the rest.

    >>> rhythm = [20.0, 40.0, 80.0, 160.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    >>> detect([2000.0, 1600.0] + rhythm * 12)[0]
    10
    """
    x = np.asarray(samples, dtype=float)
    found = _detect(x, min_period, max_period, threshold)
    if found[0]:
        return found
    # ranks of a random walk clipped at 0 (flat runs of ties) can bump at a lag: a period there
    # must also stand out from the dip before it, as a real one does
    return _detect(_ranks(x), min_period, max_period, threshold, prominence=threshold)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their mean rank (so a run of idle zeros stays flat)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse]


def _detect(x: np.ndarray, min_period: int, max_period: int, threshold: float,
            prominence: float = 0.0) -> tuple[int, float]:
    n = len(x)
    hi = min(max_period, n // 2)
    if hi < min_period:
        return 0, 0.0
    x = x - x.mean()
    var = float(np.dot(x, x))
    if var <= 1e-12 * max(1.0, n):
        return 0, 0.0
    acf = _acf(x, hi) / var * n / (n - np.arange(1, hi + 1))
    # Bartlett's band: a slowly wandering series (a random walk) has large autocorrelations at
    # every lag, and a bump in them is noise unless it clears 2 standard errors, which grow with
    # the autocorrelation at the shorter lags: sqrt((1 + 2 * sum(acf[i]^2, i < k)) / n).
    band = 2.0 * np.sqrt((1.0 + 2.0 * np.concatenate(([0.0], np.cumsum(acf ** 2)[:-1]))) / n)
    peaks = [k for k in range(min_period, hi + 1)
             if acf[k - 1] >= max(threshold, band[k - 1])
             and acf[k - 1] >= acf[k - 2]
             and (k == hi or acf[k - 1] >= acf[k])
             and acf[k - 1] - acf[:k - 1].min() >= prominence]
    if not peaks:
        return 0, 0.0
    best = max(acf[k - 1] for k in peaks)
    for k in peaks:
        if acf[k - 1] >= 0.85 * best:
            return k, float(acf[k - 1])
    return 0, 0.0


def _acf(x: np.ndarray, hi: int) -> np.ndarray:
    """``sum(x[:-k] * x[k:])`` for k = 1..hi: by FFT (O(n log n)) where the lags are many, so a
    search up to half of a day of ticks stays cheap; plain dot products where they are few."""
    n = len(x)
    if hi <= 32:
        return np.array([np.dot(x[:-k], x[k:]) for k in range(1, hi + 1)])
    size = 1 << (2 * n - 1).bit_length()
    f = np.fft.rfft(x, size)
    return np.fft.irfft(f * np.conjugate(f), size)[1:hi + 1]


def detect_long(samples, max_period: int | None = None, threshold: float = 0.3
                ) -> tuple[int, float]:
    """:func:`detect` over every lag up to half the samples (or ``max_period``): the period of a
    whole trace, as an offline baseline is given it.

    >>> x = [3.0 if i % 700 < 90 else 0.0 for i in range(3000)]
    >>> detect_long(x)[0]
    700
    """
    x = np.asarray(samples, dtype=float)
    return detect(x, 2, max_period or len(x) // 2, threshold)
