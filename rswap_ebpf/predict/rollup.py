"""Multi-resolution memory of one task x resource: raw ticks for the recent past, rolled-up
buckets for days to weeks, in fixed-size arrays (so a profile's memory is bounded and known).

Raw ticks are kept for the last ``raw_ticks`` samples; buckets of 10 s, 1 min, 10 min and 1 h
(by default; in ticks, from the tick length) keep the mean, the max and a high quantile of the
ticks they cover, for 1 h, 1 day, 1 week and 2 weeks.  A bucket of a coarser level is made
from the finer level's closed buckets (its mean the mean of theirs, its max the max, its
quantile the quantile of theirs: an approximation of the ticks' quantile that needs no ticks),
so a sample costs O(1), amortised: the finest bucket's quantile is computed once when it closes.

A daily season is then 144 ten-minute buckets, a weekly one 168 hourly ones: a period search
runs over a few hundred numbers, not 86,400 or 604,800 ticks.

>>> r = Rollups(tick_s=1.0, widths_s=(2.0, 4.0), capacity=(8, 8), raw_ticks=16)
>>> for y in range(10):
...     r.add(float(y))
>>> r.means(0).tolist(), r.maxes(1).tolist()
([0.5, 2.5, 4.5, 6.5, 8.5], [3.0, 7.0])
>>> r.value_at(7), r.bucket_mean_at(1, 5)
(7.0, 5.5)
"""
from __future__ import annotations

import numpy as np

#: the levels' bucket widths (seconds) and how many buckets each keeps: 1 h of 10 s, 1 day of
#: 1 min, 1 week of 10 min, 2 weeks of 1 h
WIDTHS_S = (10.0, 60.0, 600.0, 3600.0)
CAPACITY = (360, 1440, 1008, 336)
#: raw ticks kept: the longest season a model can follow tick by tick
RAW_TICKS = 4096
#: the high quantile a bucket keeps besides its mean and max
QUANTILE = 0.9

_MEAN, _MAX, _Q = 0, 1, 2


class Rollups:
    """Raw ticks and rolled-up buckets of one series (see the module's docstring)."""

    def __init__(self, tick_s: float = 1.0, widths_s=WIDTHS_S, capacity=CAPACITY,
                 raw_ticks: int = RAW_TICKS, quantile: float = QUANTILE):
        tick_s = float(tick_s) if tick_s and tick_s > 0 else 1.0
        widths: list[int] = []
        for w in widths_s:  # whole ticks, each level a whole number of the finer one's buckets
            ticks = max(1, int(round(float(w) / tick_s)))
            if widths:
                ticks = widths[-1] * max(1, int(round(ticks / widths[-1])))
            widths.append(ticks)
        self.tick_s = tick_s
        self.widths = tuple(widths)
        self.capacity = tuple(int(c) for c in capacity)
        self.quantile = float(quantile)
        self.raw_ticks = int(raw_ticks)
        self.n = 0  # samples added: the index of the next one
        self._raw = np.zeros(self.raw_ticks, dtype=np.float32)
        self._buckets = [np.zeros((3, c), dtype=np.float32) for c in self.capacity]
        self.closed = [0] * len(self.widths)  # buckets closed per level
        self._open_ticks: list[float] = []  # the finest open bucket's ticks (at most widths[0])
        # per coarser level: the open bucket's (sum of means, max, quantiles of its children)
        self._open = [[0.0, 0.0, []] for _ in self.widths[1:]]

    # -- learning ------------------------------------------------------------------------------
    def add(self, y: float) -> None:
        y = float(y)
        self._raw[self.n % self.raw_ticks] = y
        self.n += 1
        self._open_ticks.append(y)
        if len(self._open_ticks) >= self.widths[0]:
            ticks = np.asarray(self._open_ticks, dtype=float)
            self._open_ticks = []
            self._close(0, float(ticks.mean()), float(ticks.max()),
                        float(np.quantile(ticks, self.quantile)))

    def _close(self, level: int, mean: float, top: float, q: float) -> None:
        b = self._buckets[level]
        j = self.closed[level] % self.capacity[level]
        b[_MEAN, j], b[_MAX, j], b[_Q, j] = mean, top, q
        self.closed[level] += 1
        if level + 1 >= len(self.widths):
            return
        acc = self._open[level]
        acc[0] += mean
        acc[1] = max(acc[1], top) if acc[2] else top
        acc[2].append(q)
        per = self.widths[level + 1] // self.widths[level]
        if len(acc[2]) >= per:
            qs = np.asarray(acc[2], dtype=float)
            self._open[level] = [0.0, 0.0, []]
            self._close(level + 1, acc[0] / per, acc[1], float(np.quantile(qs, self.quantile)))

    # -- reading -------------------------------------------------------------------------------
    def _ring(self, level: int, row: int) -> np.ndarray:
        """One row of ``level``'s kept buckets, oldest first."""
        c, k = self.capacity[level], self.closed[level]
        b = self._buckets[level][row]
        if k <= c:
            return b[:k].astype(float)
        j = k % c
        return np.concatenate((b[j:], b[:j])).astype(float)

    def means(self, level: int) -> np.ndarray:
        return self._ring(level, _MEAN)

    def maxes(self, level: int) -> np.ndarray:
        return self._ring(level, _MAX)

    def quantiles(self, level: int) -> np.ndarray:
        return self._ring(level, _Q)

    def raw(self, last: int | None = None) -> np.ndarray:
        """The kept raw ticks (the last ``last`` of them), oldest first."""
        k = min(self.n, self.raw_ticks, last if last is not None else self.raw_ticks)
        idx = np.arange(self.n - k, self.n) % self.raw_ticks
        return self._raw[idx].astype(float)

    def has_raw(self, t: int) -> bool:
        return self.n - self.raw_ticks <= t < self.n and t >= 0

    def value_at(self, t: int) -> float | None:
        """Sample ``t`` (0 = the first added), where it is still kept raw."""
        return float(self._raw[t % self.raw_ticks]) if self.has_raw(t) else None

    def bucket_mean_at(self, level: int, t: int) -> float | None:
        """The mean of ``level``'s closed bucket holding sample ``t``, where it is still kept."""
        j = t // self.widths[level] if t >= 0 else -1
        if j < 0 or j >= self.closed[level] or j < self.closed[level] - self.capacity[level]:
            return None
        return float(self._buckets[level][_MEAN, j % self.capacity[level]])

    def span(self, level: int) -> int:
        """Ticks ``level``'s kept buckets cover."""
        return min(self.closed[level], self.capacity[level]) * self.widths[level]

    def nbytes(self) -> int:
        """Bytes of the arrays (what bounds a profile's memory; the open buckets add at most one
        finest bucket of ticks)."""
        return self._raw.nbytes + sum(b.nbytes for b in self._buckets)

    # -- checkpoints ---------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_raw"] = self._raw.tobytes()
        state["_buckets"] = [b.tobytes() for b in self._buckets]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._raw = np.frombuffer(state["_raw"], dtype=np.float32).copy()
        self._buckets = [np.frombuffer(b, dtype=np.float32).reshape(3, c).copy()
                         for b, c in zip(state["_buckets"], self.capacity)]
        if self._raw.shape != (self.raw_ticks,):
            from rswap_ebpf.predict.checkpoint import CheckpointError

            raise CheckpointError("rollups: raw ticks of the wrong size")
