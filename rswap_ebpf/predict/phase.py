"""Candidates' losses by phase of the season: which model is best *here* in the period.

On a periodic load the model that forecasts a burst's start best is rarely the one that is best
over the whole period: across a long idle stretch every candidate forecasts 0 and a ranking on
recent error is decided by the last burst's body.  :class:`PhaseLosses` keeps, per candidate,
its allocation loss at each slice of the season (``bins`` slices, at most one per tick), as an
exponentially weighted mean over periods with a half-life of ``half_periods`` periods.  The
selection then ranks the candidates on their losses at the slices the next ticks fall in.

A slice's mean is shrunk toward the candidate's loss over all phases (``prior_weight``
samples' worth): a slice has seen few samples, a few periods' worth, and its own mean alone is
noisy; where the phases do not differ, the ranking is the overall one.  Until every slice ahead
has been seen in ``min_periods`` periods there is no ranking (None), and the overall one serves.

>>> ph = PhaseLosses(prior_weight=2)
>>> for t in range(40):                      # a season of 10 ticks, 4 periods
...     burst = t % 10 == 0
...     ph.add("a", t, 10, 5.0 if burst else 0.0)
...     ph.add("b", t, 10, 1.0)
>>> overall = {"a": 0.5, "b": 1.0}
>>> r = ph.ranking(40, 1, overall)           # the next tick is a burst: a is worse there
>>> r["a"] > r["b"]
True
>>> r = ph.ranking(41, 1, overall)           # between bursts a is better
>>> r["a"] < r["b"]
True
"""
from __future__ import annotations

from array import array


class PhaseLosses:
    """Per candidate, (weighted sum, weight) of its loss at each slice of one season."""

    def __init__(self, bins: int = 60, half_periods: float = 2.0, min_periods: int = 2,
                 prior_weight: float = 20.0):
        self.bins = max(1, int(bins))
        self.half_periods = float(half_periods)
        self.min_periods = max(1, int(min_periods))
        self.prior_weight = max(0.0, float(prior_weight))
        self.season = 0
        self._n = 0  # slices of the current season: min(bins, season)
        #: per candidate, 2 floats a slice: weighted sum of losses, weight
        self._sums: dict[str, array] = {}
        #: per slice, the period it was last added in (-1: never), and in how many periods
        self._last = array("q")
        self._seen = array("q")

    def _reset(self, season: int) -> None:
        self.season = season
        self._n = min(self.bins, season) if season >= 2 else 0
        self._sums = {}
        self._last = array("q", [-1]) * self._n
        self._seen = array("q", [0]) * self._n

    def _slice(self, at: int) -> int:
        return (at % self.season) * self._n // self.season

    def add(self, name: str, at: int, season: int, loss: float) -> None:
        """Count ``loss``, the candidate's loss on sample ``at`` (its index in the profile's
        slots), under the season of ``season`` ticks (0: none, nothing is kept).  A new season
        starts the counts again."""
        if season != self.season:
            self._reset(season)
        if not self._n:
            return
        s, k = self._slice(at), at // self.season
        sums = self._sums.get(name)
        if sums is None:
            sums = self._sums[name] = array("f", [0.0]) * (2 * self._n)
        last = self._last[s]
        weight = 1.0
        if k > last:
            if last >= 0:  # the slice's counts age by the periods since
                decay = 0.5 ** ((k - last) / self.half_periods)
                for other in self._sums.values():
                    other[2 * s] *= decay
                    other[2 * s + 1] *= decay
            self._last[s] = k
            self._seen[s] += 1
        elif k < last:  # a replayed sample, older than the slice's latest
            weight = 0.5 ** ((last - k) / self.half_periods)
        sums[2 * s] += weight * loss
        sums[2 * s + 1] += weight

    def forget(self, name: str) -> None:
        """A candidate rebuilt: its counts go (its replay adds them again)."""
        self._sums.pop(name, None)

    def ranking(self, at: int, horizon: int, overall: dict[str, float]) -> dict[str, float] | None:
        """Each of ``overall``'s candidates' loss at the slices of samples ``at`` to
        ``at + horizon - 1``, shrunk toward its loss in ``overall``; None until each of those
        slices has been seen in ``min_periods`` periods."""
        if not self._n or not overall:
            return None
        slices = {self._slice(t) for t in range(at, at + max(1, horizon))}
        if any(self._seen[s] < self.min_periods for s in slices):
            return None
        w = self.prior_weight
        out = {}
        for name, g in overall.items():
            sums = self._sums.get(name)
            num = den = 0.0
            if sums is not None:
                for s in slices:
                    num += sums[2 * s]
                    den += sums[2 * s + 1]
            if den + w <= 0.0:
                return None
            out[name] = (num + w * g) / (den + w)
        return out

    # -- checkpoints: arrays as bytes (a checkpoint holds data, not array objects) -------------
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_sums"] = {n: a.tobytes() for n, a in self._sums.items()}
        state["_last"] = self._last.tobytes()
        state["_seen"] = self._seen.tobytes()
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._sums = {n: array("f", b) for n, b in self._sums.items()}
        self._last = array("q", self._last)
        self._seen = array("q", self._seen)
