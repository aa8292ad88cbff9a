"""Online model selection: every candidate learns, the one with the lowest recent error serves.

The error that counts is the one allocation pays for.  With ``loss="pinball"`` (the default) a
forecast below the demand costs ``quantile`` per unit and one above it ``1 - quantile``: a
shortfall starves the task, slack only wastes units, so with ``quantile=0.9`` running short is
nine times worse than holding too much.  ``loss="mae"`` ranks by plain accuracy.  Each candidate's
forecasts for every step of ``horizon`` are scored when the value they were about arrives, and the
scores are averaged with an exponential decay of ``half_life`` samples.

With the pinball loss the forecaster serves an upper quantile, and the headroom comes from the
data: every candidate's point forecast is raised by the ``quantile`` of its own recent errors at
that step ahead (split-conformal style, over the last ``calibration`` samples; only the errors
of the ``neighbours`` past forecasts nearest in value count, so a forecast of an idle tick is
raised by what idle forecasts missed, not by the bursts' errors), and candidates are
ranked on those raised forecasts.  With ``loss="mae"`` the point forecasts serve as they are.

Seasonal candidates get the period found online by :class:`~.period.PeriodDetector`; when it
changes they are rebuilt and replayed over the kept history, so nothing starts cold.  The
``median`` candidate combines the others (per step, the median of their point forecasts): on
noisy periodic data no single model is reliably best, and a median of several is rarely far
from the best of them.

>>> a = AutoForecaster(candidates=("last_value", "seasonal_naive"), loss="mae", max_period=20)
>>> for i in range(120):
...     a.learn_one(10.0 if i % 6 == 0 else 1.0)
>>> a.period, a.serving
(6, 'seasonal_naive')
>>> a.forecast(6)
[10.0, 1.0, 1.0, 1.0, 1.0, 1.0]
"""
from __future__ import annotations

import copy
import itertools
import struct
from array import array
from collections import deque
from dataclasses import dataclass

import numpy as np

from rswap_ebpf.errors import ConfigError
from rswap_ebpf.model.checks import check_bool, check_fraction, check_whole
from rswap_ebpf.predict.candidates import (BLEND_TOP, CANDIDATES, COMBINERS, LONG_CANDIDATES, LOSSES,
                                            _HALF_MAX, _LAST_VALUE_WITHOUT_PERIOD, CandidateError,
                                            _median, pinball)
from rswap_ebpf.predict.forecasters import (Base, LastValue, QuantileLags, SeasonalEWMA, SeasonalFractional,
                          SeasonalLevel, SeasonalNaive, holt_winters, single, snarimax)
from rswap_ebpf.predict.longseason import LongPeriodDetector, LongSeason
from rswap_ebpf.predict.period import PeriodDetector
from rswap_ebpf.predict.phase import PhaseLosses
from rswap_ebpf.predict.rollup import Rollups

def _unit(r: float) -> float:
    """An autocorrelation estimate as a confidence: within 0-1 (a short series' estimate can
    pass 1), 3 decimals."""
    return round(min(1.0, max(0.0, float(r))), 3)


class AutoForecaster(Base):
    name = "auto"

    def __init__(self, candidates: tuple[str, ...] | list[str] = CANDIDATES, loss: str = "pinball",
                 quantile: float = 0.9, horizon: int = 5, half_life: float = 50.0,
                 scale: float = 1.0, max_period: int = 120, period: int = 0,
                 history: int = 600, min_scored: int = 10, hysteresis: float = 0.05,
                 calibration: int = 100, seasonal_raise: bool = False, floor: bool = True,
                 release_after: int = 3, neighbours: int = 30, tick_s: float = 1.0):
        unknown = [c for c in candidates if c not in CANDIDATES]
        if unknown or not candidates:
            raise ConfigError("forecaster.candidates",
                              f"unknown {unknown} (known: {', '.join(CANDIDATES)})")
        for comb in COMBINERS:
            if comb in candidates and len(set(candidates) - set(COMBINERS)) < 2:
                raise ConfigError("forecaster.candidates", f"{comb!r} combines at least two others")
        if loss not in LOSSES:
            raise ConfigError("forecaster.loss", f"{loss!r} is not one of {', '.join(LOSSES)}")
        check_fraction(quantile, "forecaster.quantile")
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
        self.seasonal_raise = check_bool(seasonal_raise, "forecaster.seasonal_raise")
        self.floor = check_bool(floor, "forecaster.floor")
        self.release_after = check_whole(release_after, "forecaster.release_after")  # 0: never
        self.neighbours = check_whole(neighbours, "forecaster.neighbours")  # 0: all errors
        self._decay = 0.5 ** (1.0 / max(1.0, self.half_life))
        self._fixed_period = self.period > 0
        self._detector = PeriodDetector(max_period=self.max_period, every=3)
        #: seconds per tick: sizes the rolled-up buckets (10 s ... 1 h)
        self.tick_s = float(tick_s)
        #: the profile's multi-resolution memory (raw ticks + buckets), and the long season
        #: found on it (ticks, 0: none), beyond the raw period search's ``max_period``
        self.rollups = Rollups(tick_s=self.tick_s)
        self._long = LongPeriodDetector(min_ticks=self.max_period)
        self.long_period = 0
        self._hist: deque[float] = deque(maxlen=self.history)
        self._models: dict[str, Base] = {}
        self._pending: dict[str, deque[tuple[list[float], list[float]]]] = {}
        # per step ahead, actual - forecast for consecutive samples up to the latest (index
        # _at - 1), so a residual's sample index is implied by its position, not stored
        self._resid: dict[str, list[deque[float]]] = {}
        self._at = 0  # index of the next sample to arrive
        self._loss: dict[str, float] = {}
        self._mae: dict[str, float] = {}
        self._scored: dict[str, int] = {}
        self._ewm_sums: dict[tuple[str, str], tuple[float, float]] = {}
        #: per model and step ahead, (weighted sum, weight) of |error|: the blend's weights
        self._step_err: dict[str, list[list[float]]] = {}
        #: per candidate, its loss at each phase of the longest season found: the ranking
        #: where the next ticks fall in the period
        self._phase = PhaseLosses()
        self.serving = self.candidates[0]
        self._build(self.candidates)

    # -- candidates ----------------------------------------------------------------------------
    def _make(self, name: str) -> Base:
        p = self.period
        if name in LONG_CANDIDATES:
            return LongSeason(period=self.long_period, periods=3 if name.endswith("avg") else 1,
                              rollups=self.rollups, start=self.rollups.n - len(self._hist))
        if name == "last_value":
            return LastValue()
        if name == "seasonal_naive":
            return SeasonalNaive(period=max(1, p))
        if name == "seasonal_ewma":
            return SeasonalEWMA(period=max(1, p), alpha=0.3)
        if name == "seasonal_fractional":
            return SeasonalFractional(period=max(1, p))
        if name == "seasonal_level":
            return SeasonalLevel(period=max(1, p))
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
        names = [n for n in self.candidates if n in names]
        for name in names:
            if name not in COMBINERS:
                self._models[name] = self._make(name)
                self._step_err[name] = [[0.0, 0.0] for _ in range(self.horizon)]
            self._pending[name] = deque(maxlen=self.horizon)
            self._resid[name] = [deque(maxlen=self.calibration) for _ in range(self.horizon)]
            for key in (self._loss, self._mae, self._scored):
                key.pop(name, None)
            for kind in ("loss", "mae"):
                self._ewm_sums.pop((kind, name), None)
            self._phase.forget(name)
        self._at -= len(self._hist)
        self._replay_from = self._at  # _raise: the kept history is ahead of _at while replayed
        prev = None
        hist = list(self._hist)
        try:
            for i, y in enumerate(hist):
                low = self._release_at(hist, i)
                for name in names:
                    self._score(name, y, prev, low)
                    if name not in COMBINERS:
                        self._models[name].learn_one(y)
                self._at += 1
                prev = y
                self._push_all(names)
        finally:
            del self._replay_from


    def _push_all(self, names) -> None:
        for name in names:
            if name not in COMBINERS:
                self._push(name)
        for name in COMBINERS:  # after the models: they combine this tick's forecasts
            if name in names:
                self._push(name)

    def _score(self, name: str, y: float, prev: float | None,
               release: float | None = None) -> None:
        """Score the forecasts made for ``y``; ``prev`` is the sample before it.

        With ``floor``, what is scored is the allocation, not the bare forecast: the swap manager
        never allocates less than the last observed use (``SwapManager.demand``), so the tick's
        allocation is at least ``prev``; where that covers ``y`` the forecast's shortfall there
        costs nothing, and its residual counts as at most 0 when the raise is calibrated (the
        raise is then what the floor leaves uncovered, not what the forecast alone misses).
        ``release`` is what :meth:`release` allowed the floor to drop to for that tick.
        """
        floor = prev if self.floor and prev is not None else None
        if floor is not None and release is not None:
            floor = min(floor, release)
        covered = floor is not None and y <= floor
        total, n = 0.0, 0
        for age, (point, upper) in enumerate(reversed(self._pending[name]), start=1):
            f = point[age - 1]
            self._resid[name][age - 1].append(
                self._half(min(y - f, 0.0) if covered else y - f))
            se = self._step_err.get(name)
            if se is not None:
                acc = se[age - 1]
                acc[0] = self._decay * acc[0] + abs(y - f)
                acc[1] = self._decay * acc[1] + 1.0
            alloc = upper[age - 1] if floor is None else max(upper[age - 1], floor)
            total += pinball(y, alloc, self.quantile) if self.loss == "pinball" \
                else abs(y - f)
            n += 1
            if age == 1:
                self._mae[name] = self._ewm(("mae", name), abs(y - f))
        if n:
            self._loss[name] = self._ewm(("loss", name), total / n)
            self._phase.add(name, self._at, self.found(), total / n)
            self._scored[name] = self._scored.get(name, 0) + 1

    def _half(self, e: float) -> float:
        """A residual as it is kept: a half-precision float of ``e / scale`` (3 significant
        digits, plenty for a quantile), times ``scale``.  Kept so in memory too, a checkpoint
        stores residuals in 2 bytes each and a restore gives back exactly the same values."""
        x = min(max(e / self.scale, -_HALF_MAX), _HALF_MAX)
        return struct.unpack("<e", struct.pack("<e", x))[0] * self.scale

    def _ewm(self, key: tuple[str, str], sample: float) -> float:
        """Exponentially weighted mean with the weights summed, not seeded with the first sample:
        seeding gives that one sample (often a cold-start error) the weight of all the past, which
        after 150 samples still moved a model's loss by a fifth and picked the wrong one."""
        num, den = self._ewm_sums.get(key, (0.0, 0.0))
        num, den = self._decay * num + sample, self._decay * den + 1.0
        self._ewm_sums[key] = (num, den)
        return num / den

    def _point(self, name: str, horizon: int) -> list[float]:
        if name not in COMBINERS:
            return self._models[name].forecast(horizon)
        names = self._distinct()
        if horizon <= self.horizon and all(self._pending[n] for n in names):
            per_model = [self._pending[n][-1][0][:horizon] for n in names]
        else:
            per_model = [self._models[n].forecast(horizon) for n in names]
        if name == "median":
            return [_median(step) for step in zip(*per_model)]
        out = []
        for h, step in enumerate(zip(*per_model)):
            errs = []
            for n in names:
                num, den = self._step_err[n][min(h, self.horizon - 1)]
                errs.append(num / den if den > 0 else None)
            if any(e is None for e in errs):
                out.append(_median(step))
                continue
            floor = 1e-9 + 1e-6 * max(errs)
            best = sorted(range(len(errs)), key=lambda i: errs[i])[:BLEND_TOP]
            w = [1.0 / (errs[i] + floor) ** 2 for i in best]
            out.append(sum(wi * step[i] for wi, i in zip(w, best)) / sum(w))
        return out

    def _distinct(self) -> list[str]:
        """The models a combination combines.  Without a period, seasonal-naive and
        seasonal-fractional repeat the last value: one forecast, which must not get three votes
        in the median, so only the first of them counts."""
        names = [n for n in self._models if self.long_period >= 2 or n not in LONG_CANDIDATES]
        if self.period >= 2:
            return names
        same = [n for n in names if n in _LAST_VALUE_WITHOUT_PERIOD]
        return [n for n in names if n not in same[1:]]

    def _push(self, name: str) -> None:
        # single precision, as a checkpoint stores them (7 digits: allocations are whole units)
        point = [single(v) for v in self._point(name, self.horizon)]
        self._pending[name].append((point, [single(v) for v in self._raise(name, point)]))

    # -- protocol ------------------------------------------------------------------------------
    def learn_one(self, y: float, x: dict | None = None) -> None:
        y = single(y)  # what is kept is what a checkpoint stores: 4 bytes a sample
        prev = self._hist[-1] if self._hist else None
        low = self.release()
        for name in self.candidates:
            self._score(name, y, prev, low)
        self._hist.append(y)
        self._at += 1
        self.rollups.add(y)
        for m in self._models.values():
            m.learn_one(y)
        lp = self._long.update(self.rollups)
        if lp != self.long_period:
            self.long_period = lp
            if any(n in LONG_CANDIDATES for n in self.candidates):
                self._build(LONG_CANDIDATES)  # replays the kept history through them
        if not self._fixed_period:
            p = self._detector.update(y)
            if p != self.period:
                self.period = p
                self._build(self.candidates)  # replays the history, y included
                self._choose()
                return
        self._push_all(self.candidates)
        self._choose()

    def release(self) -> float | None:
        """How far the allocation floor may drop for the next tick, or None: not at all.

        The swap manager never allocates less than the use just seen, so a burst's level is held
        for the tick after the burst, which is slack every period.  With a period known, and
        the use dropping right after this phase in each of the last ``release_after`` periods
        (the burst ended here that many times in a row), the floor may drop to the highest of
        those next-phase ticks.  Otherwise (a burst still going, one whose edge slides between
        ticks, no period yet, too little history), None: the floor holds.  The candidates are
        scored against the same floor, so the raise covers what the release leaves open.
        """
        return self._release_at(self._hist, len(self._hist))

    def _release_at(self, hist, n: int) -> float | None:
        """:meth:`release` for the tick after the first ``n`` samples of ``hist`` (model
        rebuilds score the kept history against the floor each tick had)."""
        p, k = self.period, self.release_after
        if k <= 0 or p < 2 or n < k * p + 1:
            return None
        nxt = [hist[n - j * p] for j in range(1, k + 1)]
        if any(hist[n - 1 - j * p] <= v for j, v in enumerate(nxt, start=1)):
            return None  # it did not drop right after this phase every time
        return max(nxt)

    def _raise(self, name: str, point: list[float]) -> list[float]:
        """With the pinball loss: the point forecast plus the quantile of this model's errors.

        Only the errors of the ``neighbours`` past forecasts (at that step ahead) nearest in
        value to this one count: errors grow with what is forecast, so an idle tick forecast at
        0 is raised by what forecasts of 0 missed (often nothing), and a burst by what burst
        forecasts missed (locally adaptive split-conformal: one quantile over all errors raises
        idle ticks by the bursts' errors and under-raises the bursts).  A past forecast is read
        back from its sample and residual (``y - r``; where the floor covered the sample, the
        residual was clipped at 0 and the forecast is taken as the sample), so nothing more is
        stored.  With a period (and ``seasonal_raise``), the errors made at the same phase of
        the period, give or take one tick, are taken first.  Too few errors: all count.
        """
        if self.loss != "pinball":
            return point
        p = self.period if self.seasonal_raise else 0
        k = self.neighbours
        # sample index of the kept history's first: it is replayed through rebuilt models
        base = getattr(self, "_replay_from", self._at - len(self._hist))
        hist = None
        if p < 3 and k:
            fast = self._raise_near(name, point, base)
            if fast is not None:
                return fast
        out = []
        for h, f in enumerate(point):
            res = self._resid[name][min(h, self.horizon - 1)]
            n = len(res)
            if n >= 5:
                r = np.fromiter(res, float, n)
                first = self._at - n  # sample index of res[0]
                idx = np.arange(n)
                if p >= 3:
                    same = np.flatnonzero((first + idx - (self._at + h) + 1) % p <= 2)
                    if len(same) >= 5:
                        idx = same
                if k and len(idx) > k and first >= base:
                    if hist is None:
                        hist = np.fromiter(self._hist, float, len(self._hist))
                    dist = np.abs(hist[first - base + idx] - r[idx] - f)
                    # the k nearest, the most recent first among equals
                    idx = idx[::-1][np.argsort(dist[::-1], kind="stable")[:k]]
                errs = np.sort(r[idx])
                f = f + float(errs[min(len(errs) - 1, int(self.quantile * len(errs)))])
            out.append(max(0.0, f))
        return out

    def _raise_near(self, name: str, point: list[float], base: int) -> list[float] | None:
        """:meth:`_raise` from the nearest forecasts' errors, every step at once (the same
        figures; a tick's raises are most of what a candidate costs to learn).  None where the
        steps do not line up: steps kept unequally long, or beyond the kept steps."""
        per_step = self._resid[name]
        n, steps = len(per_step[0]), len(point)
        k = self.neighbours
        first = self._at - n
        if steps > len(per_step) or n <= k or first < base \
                or any(len(d) != n for d in per_step[:steps]):
            return None
        r = np.fromiter(itertools.chain.from_iterable(per_step[:steps]), float,
                        n * steps).reshape(steps, n)
        off = first - base
        hist = np.fromiter(itertools.islice(self._hist, off, off + n), float, n)
        dist = np.abs(hist - r - np.asarray(point, float)[:, None])[:, ::-1]
        near = np.take_along_axis(r[:, ::-1], np.argsort(dist, axis=1, kind="stable")[:, :k],
                                  axis=1)
        near.sort(axis=1)
        raised = np.asarray(point, float) + near[:, min(k - 1, int(self.quantile * k))]
        return [max(0.0, float(v)) for v in raised]

    def _choose(self) -> None:
        ready = {n: l for n, l in self._loss.items() if self._scored.get(n, 0) >= self.min_scored
                 and (self.long_period >= 2 or n not in LONG_CANDIDATES)}
        if not ready:
            return
        # where the season is known, the losses at the phase the next ticks fall in
        ready = self._phase.ranking(self._at, self.horizon, ready) or ready
        best = min(ready, key=ready.get)
        cur = ready.get(self.serving)
        if cur is None or ready[best] < (1.0 - self.hysteresis) * cur:
            self.serving = best

    def forecast(self, horizon: int, xs: list[dict] | None = None) -> list[float]:
        pend = self._pending.get(self.serving)
        if pend and horizon <= self.horizon:
            return list(pend[-1][1][:horizon])
        return self._raise(self.serving, self._point(self.serving, horizon))

    # -- checkpoints ---------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        """Compact: the period detector's window is the tail of the kept history (not stored
        twice), and residuals, which only feed a quantile and are kept at half precision (see
        :meth:`_half`), are stored as 2-byte floats -- they were most of a checkpoint's bytes."""
        state = dict(self.__dict__)
        det = state["_detector"] = copy.copy(self._detector)
        det._buf = None
        state["_resid"] = {n: [struct.pack(f"<{len(d)}e", *(e / self.scale for e in d))
                               for d in per_step]
                           for n, per_step in self._resid.items()}
        state["_resid_format"] = "e"
        state["_hist"] = array("f", self._hist).tobytes()  # samples are single precision
        h = self.horizon
        if all(len(p) == h and len(u) == h for d in self._pending.values() for p, u in d):
            # forecasts awaiting their truth, (point, raised) per tick: 4-byte floats too
            state["_pending"] = {n: array("f", [v for p, u in d for v in p + u]).tobytes()
                                 for n, d in self._pending.items()}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if isinstance(self._hist, bytes):
            self._hist = deque(array("f", self._hist), maxlen=self.history)
        h = self.horizon
        for n, d in list(self._pending.items()):
            if isinstance(d, bytes):
                v = array("f", d).tolist()
                self._pending[n] = deque(((v[i:i + h], v[i + h:i + 2 * h])
                                          for i in range(0, len(v), 2 * h)), maxlen=h)
        # checkpoints written before the blend and the allocation floor existed
        self.__dict__.setdefault("floor", False)
        self.__dict__.setdefault("release_after", 0)  # before the floor's release existed
        self.__dict__.setdefault("neighbours", 0)  # before the raise came from near forecasts
        if "rollups" not in self.__dict__:  # before the multi-resolution memory
            self.tick_s = 1.0
            self.rollups = Rollups()
            self._long = LongPeriodDetector(min_ticks=self.max_period)
            self.long_period = 0
        if "_phase" not in self.__dict__:  # before the ranking by phase
            self._phase = PhaseLosses()
        if "_step_err" not in self.__dict__:
            self._step_err = {n: [[0.0, 0.0] for _ in range(self.horizon)] for n in self._models}
        det = self._detector
        if det._buf is None:
            det._buf = deque(list(self._hist)[-det.window:], maxlen=det.window)
        fmt = self.__dict__.pop("_resid_format", "f")  # "f": float32, before half precision
        for n, per_step in self._resid.items():
            if per_step and isinstance(per_step[0], bytes):
                if fmt == "e":
                    self._resid[n] = [deque((v * self.scale for v in
                                             struct.unpack(f"<{len(b) // 2}e", b)),
                                            maxlen=self.calibration) for b in per_step]
                else:
                    self._resid[n] = [deque(array("f", b), maxlen=self.calibration)
                                      for b in per_step]

    # -- reporting -----------------------------------------------------------------------------
    def errors(self) -> dict[str, CandidateError]:
        return {n: CandidateError(n, self._loss.get(n), self._mae.get(n), self._scored.get(n, 0))
                for n in self.candidates}

    @property
    def serving_model(self) -> str:
        """The serving candidate as what it does now: a seasonal one with no period found
        repeats the last value, and is named so (never a seasonal name on a last-value
        forecast)."""
        if self.serving in _LAST_VALUE_WITHOUT_PERIOD and self.period < 2:
            return "last_value"
        if self.serving in LONG_CANDIDATES and self.long_period < 2:
            return "last_value"
        return self.serving

    def season(self) -> tuple[int, float, str]:
        """(period in ticks, its confidence, where it was found) of the serving model: the long
        season's for a long candidate ("buckets"), else the raw search's ("ticks"); (0, 0.0,
        "none") where the serving model follows no period.  The confidence is the
        autocorrelation at the period (0-1)."""
        if self.serving in LONG_CANDIDATES or (self.serving in COMBINERS and self.period < 2):
            if self.long_period >= 2:
                return self.long_period, _unit(self._long.confidence), "buckets"
        if self.period >= 2 and self.serving != "last_value":
            return self.period, _unit(self._detector.strength), "ticks"
        return 0, 0.0, "none"

    def found(self) -> int:
        """The longest season either search holds now (ticks, 0: none), whether or not the
        serving model follows it."""
        return max(self.long_period if self.long_period >= 2 else 0,
                   self.period if self.period >= 2 else 0)

    @property
    def serving_loss(self) -> float | None:
        return self._loss.get(self.serving)

