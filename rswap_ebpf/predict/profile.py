"""Task profiles: per task and resource, a bounded history, a forecaster and its running error.

:class:`TaskProfiler` holds the seed's prediction API: ``analyze_task``, ``update_prediction`` and
``get_predicted_needs``.
"""
from __future__ import annotations

import math
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from rswap_ebpf.model.resources import Resource, ResourceId, ResourceType, parse_resource
from rswap_ebpf.model.stats import quantile
from rswap_ebpf.predict.checkpoint import CheckpointError, dumps, loads
from rswap_ebpf.predict.forecasters import Forecaster, single
from rswap_ebpf.predict.registry import make_forecaster

DEFAULT_HISTORY = 600

_NONE: Mapping = {}


@dataclass(frozen=True)
class Prediction:
    """Forecast of one task's need for one resource over a window of ticks."""

    task: str
    resource: Resource
    series: tuple[float, ...]
    peak: float
    model: str
    mae: float | None
    samples: int
    quantile: float = 0.0          # the ``quantile_level`` quantile of ``series``
    quantile_level: float = 0.9
    loss: float | None = None      # the serving model's recent selection loss (model choice)
    period: int = 0                # ticks of the season the serving model follows (0: none)
    period_confidence: float = 0.0  # the autocorrelation at that period (0-1)
    period_source: str = "none"    # "ticks" (raw search), "buckets" (rolled-up), "given"

    def over_window(self, how: str | float = "peak") -> float:
        """What the allocator asks for: the window's peak, or a quantile of it."""
        return self.peak if how == "peak" else quantile(self.series, float(how))


@dataclass(frozen=True)
class TaskAnalysis:
    """What ``analyze_task`` reports per resource."""

    resource: Resource
    samples: int
    last: float
    mean: float
    peak: float
    model: str
    mae: float | None


class TaskProfile:
    """One task × resource: history, forecaster, and mean absolute error of its 1-step forecasts."""

    def __init__(self, task: str, resource: Resource, forecaster: Forecaster,
                 history: int = DEFAULT_HISTORY, error_alpha: float = 0.1,
                 tick_s: float | None = None):
        self.task = task
        self.resource = resource
        self.forecaster = forecaster
        #: seconds between its samples (None: not known): a period in ticks means this many
        #: seconds, and a checkpoint made at another tick length counts other ticks
        self.tick_s = _tick_of(forecaster) if tick_s is None else float(tick_s)
        self.history: deque[float] = deque(maxlen=history)
        self.error_alpha = error_alpha
        self.mae: float | None = None
        #: the largest sample ever seen: with the pool, what bounds a forecast
        self.peak = 0.0
        self._next: float | None = None
        #: set when restored from the store: the first sample bridges the ticks since then
        self.resumed_at: float | None = None

    def __getstate__(self) -> dict:
        """History once: when the forecaster keeps the same samples (online selection does, to
        replay them into rebuilt models), the checkpoint stores them there only."""
        state = dict(self.__dict__)
        kept = getattr(self.forecaster, "_hist", None)
        n = len(self.history)
        if n and kept is not None and len(kept) >= n and \
                all(a == b for a, b in zip(self.history, list(kept)[len(kept) - n:])):
            state["history"] = ("forecaster", n, self.history.maxlen)
        return state

    def __setstate__(self, state: dict) -> None:
        hist = state.get("history")
        if isinstance(hist, tuple) and hist and hist[0] == "forecaster":
            _, n, maxlen = hist
            kept = list(state["forecaster"]._hist)
            state["history"] = deque(kept[len(kept) - n:], maxlen=maxlen)
        self.__dict__.update(state)
        if "tick_s" not in state:  # a checkpoint from before the profile kept its tick
            self.tick_s = _tick_of(self.forecaster)
        if "peak" not in state:  # a checkpoint from before the bound on forecasts
            self.peak = max(self.history, default=0.0)

    @property
    def model_name(self) -> str:
        """The model that serves: for online selection, the candidate chosen now, named for
        what it does (a seasonal model with no period found is "last_value")."""
        serving = getattr(self.forecaster, "serving_model", None) or \
            getattr(self.forecaster, "serving", None)
        if serving:
            return serving
        if getattr(self.forecaster, "period", 2) < 2 and hasattr(self.forecaster, "_window"):
            return "last_value"  # a seasonal model of period 1
        return getattr(self.forecaster, "name", type(self.forecaster).__name__)

    def season(self) -> tuple[int, float, str]:
        """(period in ticks, confidence 0-1, source) of what the serving model follows: online
        selection says (``AutoForecaster.season``); a model given its period, "given"."""
        season = getattr(self.forecaster, "season", None)
        if callable(season):
            return season()
        p = getattr(self.forecaster, "period", 0) or getattr(self.forecaster, "seasonality", 0)
        p = int(p or 0)
        return (p, 1.0, "given") if p >= 2 else (0, 0.0, "none")

    def describe(self) -> dict:
        """What status and metrics show of this profile: the serving model, its MAE, the season
        it follows and how sure the search is of it, and (``period_found``) the season the
        searches hold even where the serving model follows none."""
        period, confidence, source = self.season()
        found = getattr(self.forecaster, "found", None)
        found = found() if callable(found) else period
        return {"model": self.model_name,
                "mae": round(self.mae, 1) if self.mae is not None else None,
                "period": period,
                "period_s": round(period * (self.tick_s or 1.0), 1) if period else 0,
                "period_confidence": confidence, "period_source": source,
                "period_found": max(found, period)}

    @property
    def loss(self) -> float | None:
        return getattr(self.forecaster, "serving_loss", None)

    def release(self) -> float | None:
        """How far the allocation floor may drop for the next tick (None: it holds)."""
        rel = getattr(self.forecaster, "release", None)
        return rel() if callable(rel) else None

    def learn_one(self, y: float) -> None:
        y = single(y)  # as the forecaster keeps it, so history is stored once (see __getstate__)
        if self._next is not None:
            err = abs(y - self._next)
            self.mae = err if self.mae is None else (
                (1 - self.error_alpha) * self.mae + self.error_alpha * err)
        self.history.append(y)
        if y > self.peak:
            self.peak = y
        self.forecaster.learn_one(y)
        self._next = self.forecaster.forecast(1)[0]

    #: a forecast is at most this many times the largest sample ever seen (plus one unit)
    PEAK_FACTOR = 1.5

    def bound(self) -> float:
        """The most a forecast may say: ``PEAK_FACTOR`` x the task's largest sample (its whole
        history, not only the kept ticks) + 1, and never more than the pool (the forecaster's
        ``scale``, where it has one): a forecast of 5.5 CPUs for a task that never used 1.5,
        or of more than the pool holds, is a model gone wrong, not a plan."""
        b = self.PEAK_FACTOR * self.peak + 1.0
        pool = getattr(self.forecaster, "scale", None)
        if isinstance(pool, (int, float)) and pool > 1:
            b = min(b, float(pool))
        return b

    def forecast(self, horizon: int) -> list[float]:
        """The forecaster's series, made safe to allocate from: finite, >= 0, and bounded.

        An online model can diverge (seen in a 40-minute soak: 2e27 millicores, then inf); such
        values are replaced by the last sample, and every value is capped at :meth:`bound`.
        """
        if not self.history:
            return [0.0] * horizon
        bound = self.bound()
        raw = self.forecaster.forecast(horizon)
        # the common case, every value finite (a nan or inf makes the sum so) and inside
        # (0, bound]: kept as it is, which is what the clamps below would give
        if raw and min(raw) > 0.0 and max(raw) <= bound and math.isfinite(sum(raw)):
            return list(raw)
        last = min(self.history[-1], bound)
        isfinite = math.isfinite
        return [min(max(0.0, v), bound) if isfinite(v) else last for v in raw]

    def bridge(self, ticks: int) -> None:
        """Carry the forecaster across ``ticks`` unobserved ticks (rswap was not running).

        A seasonal model counts phase in samples: resumed after a gap as if no time had passed,
        it would expect each burst at the wrong tick.  Feeding it its own forecasts for the gap
        keeps the phase; the error statistics and the history of real samples are left alone.
        """
        if ticks <= 0 or not self.history:
            return
        for y in self.forecaster.forecast(ticks):
            self.forecaster.learn_one(y)
        self._next = self.forecaster.forecast(1)[0]


#: what status shows for a task x resource that has no profile yet (no sample learnt)
NO_PROFILE = {"model": None, "mae": None, "period": 0, "period_s": 0, "period_confidence": 0.0,
              "period_source": "none", "period_found": 0}


def _tick_of(forecaster) -> float | None:
    """The tick length a forecaster was made for, where it keeps one (online selection)."""
    tick = getattr(forecaster, "tick_s", None)
    return float(tick) if isinstance(tick, (int, float)) and tick > 0 else None


def freeze(profile: TaskProfile) -> bytes:
    """A profile as a checkpoint blob: data (JSON, zlib-compressed), never pickle."""
    return dumps(profile)


def thaw(blob: bytes) -> TaskProfile:
    """The profile a blob holds; :class:`~.checkpoint.CheckpointError` for anything else (a
    pickle written by an older rswap is refused, never unpickled)."""
    prof = loads(blob)
    if not isinstance(prof, TaskProfile):
        raise CheckpointError(f"holds a {type(prof).__name__}, not a profile")
    return prof


class TaskProfiler:
    """The profiles of every task, and the seed's prediction functions."""

    def __init__(self, forecaster_factory: Callable[[str, Resource], Forecaster] | None = None,
                 history: int = DEFAULT_HISTORY, store=None, quantile_level: float = 0.9,
                 checkpoint_every: int = 60, interval: float | None = None):
        self._factory = forecaster_factory or (lambda task, r: make_forecaster("last_value"))
        self._history = history
        self.profiles: dict[tuple[str, Resource], TaskProfile] = {}
        #: named resources (co-processors) some profile is about, besides the ResourceTypes
        self._instances: set[ResourceId] = set()
        #: task -> its profiles in ``_resources()`` order: the per-task calls of every tick read
        #: a task's few profiles instead of probing every resource there is
        self._by_task: dict[str, dict[Resource, TaskProfile]] = {}
        self._rank: dict[Resource, int] = {r: i for i, r in enumerate(ResourceType)}
        self.quantile_level = quantile_level
        #: a :class:`~.store.ProfileStore`: samples written every flush, state every
        #: ``checkpoint_every`` samples of a series, so a crash loses at most the unflushed tick.
        self.store = store
        self.checkpoint_every = max(1, int(checkpoint_every))
        self._unflushed: list[tuple[str, Resource, float]] = []
        self._since_checkpoint: dict[tuple[str, Resource], int] = {}
        #: seconds per tick: each profile's ``tick_s``; with it, a restored profile is carried
        #: across the time rswap was down, and one learnt at another tick length is not restored
        self.interval: float | None = interval

    def profile(self, task: str, resource: Resource) -> TaskProfile:
        key = (task, resource)
        prof = self.profiles.get(key)
        if prof is None:
            prof = self._load(task, resource)
            if prof is None:
                prof = self._new(task, resource)
            self._add(key, prof)
        return prof

    def _new(self, task: str, resource: Resource) -> TaskProfile:
        return TaskProfile(task, resource, self._factory(task, resource), self._history,
                           tick_s=self.interval)

    def _add(self, key: tuple[str, Resource], prof: TaskProfile) -> None:
        self.profiles[key] = prof
        task, r = key
        if isinstance(r, ResourceId) and r not in self._instances:
            self._instances.add(r)
            self._rank = {x: i for i, x in enumerate(self._resources())}
        mine = self._by_task.setdefault(task, {})
        mine[r] = prof
        if len(mine) > 1:
            rank = self._rank
            self._by_task[task] = dict(sorted(mine.items(), key=lambda kv: rank[kv[0]]))

    def _resources(self) -> list[Resource]:
        """Every resource a profile may be about, in the order per-task answers list them: the
        types, then the named instances by key."""
        return [*ResourceType, *sorted(self._instances, key=lambda r: r.key)]

    def _of(self, task: str) -> dict[Resource, TaskProfile]:
        """``task``'s profiles, in ``_resources()`` order."""
        return self._by_task.get(task, {})

    def profiles_of(self, task: str) -> Mapping[Resource, TaskProfile]:
        """``task``'s profiles by resource (read only): ``profiles[(task, r)]`` for each."""
        return self._by_task.get(task, _NONE)

    def update_prediction(self, task: str, resource: Resource, units: float,
                          slots: int = 1) -> None:
        """Feed one observed sample (units used per tick over the last ``slots`` ticks).

        A late tick's rate is learnt once for each tick it covers (at most ``history``), so a
        season keeps its phase; ``slots`` 0 (a tick in a slot already learnt) learns nothing.
        """
        if slots <= 0:
            return
        prof = self.profile(task, resource)
        resumed = getattr(prof, "resumed_at", None)
        if resumed is not None and self.interval:
            prof.resumed_at = None
            prof.bridge(min(int(round((time.time() - resumed) / self.interval)) - 1, self._history))
        for _ in range(min(slots, self._history)):
            prof.learn_one(units)
            if self.store is not None:
                self._unflushed.append((task, resource, float(units)))

    def update_many(self, samples: Mapping[str, Mapping[Resource, float]], slots: int = 1) -> None:
        """:meth:`update_prediction` for every ``{task: {resource: units}}`` of one tick, in
        that order: the same samples learnt, once per slot the tick stands for."""
        if slots <= 0:
            return
        times = min(slots, self._history)
        by_task, store, interval = self._by_task, self.store, self.interval
        unflushed = self._unflushed
        for task, per_r in samples.items():
            mine = by_task.get(task)
            for r, units in per_r.items():
                prof = mine.get(r) if mine is not None else None
                if prof is None:
                    prof = self.profile(task, r)
                    mine = by_task.get(task)
                if interval and getattr(prof, "resumed_at", None) is not None:
                    self.update_prediction(task, r, units, slots)
                    continue
                for _ in range(times):
                    prof.learn_one(units)
                    if store is not None:
                        unflushed.append((task, r, float(units)))

    def forecast_peaks(self, task: str, window: int) -> tuple[dict, dict, dict, dict]:
        """Per resource, the peak of ``task``'s forecast over ``window`` ticks, its next tick
        and the serving model (:meth:`get_predicted_needs`'s ``peak``, ``series[0]`` and
        ``model``, without the rest of a :class:`Prediction`), and :meth:`releases`."""
        horizon = max(1, window)
        peak, nxt, models, releases = {}, {}, {}, {}
        for r, prof in self._of(task).items():
            series = prof.forecast(horizon)
            peak[r] = max(series)
            nxt[r] = series[0]
            models[r] = prof.model_name
            low = prof.release()
            if low is not None:
                releases[r] = low
        return peak, nxt, models, releases

    # -- persistence ---------------------------------------------------------------------------
    def restore(self, task: str) -> list[Resource]:
        """Load every stored profile of ``task`` (its stable identity), before its first sample."""
        if self.store is None:
            return []
        out = []
        for key in self.store.resources_of(task):
            try:
                r = parse_resource(key)
            except Exception:
                continue
            if (task, r) not in self.profiles:
                prof = self._load(task, r)
                if prof is not None:
                    self._add((task, r), prof)
                    out.append(r)
        return out

    def _load(self, task: str, resource: Resource) -> TaskProfile | None:
        if self.store is None:
            return None
        stored = self.store.load(task, resource.key)
        if stored is None:
            return None
        prof = None
        samples = stored.samples  # what happened after the checkpoint
        if stored.state is not None:
            try:
                prof = thaw(stored.state)
            except CheckpointError as err:  # relearn from the samples we have
                print(f"rswap: the checkpoint of {task}/{resource.key} in {self.store.path} "
                      f"is not used ({err}); its profile starts again from the samples after it",
                      file=sys.stderr)
        if prof is not None and self.interval:
            if prof.tick_s is None:  # made before profiles kept their tick: taken as this one
                prof.tick_s = float(self.interval)
            elif abs(prof.tick_s - self.interval) > 1e-6 * self.interval:
                # its periods, phases and bucket widths count ticks of another length
                print(f"rswap: the profile of {task}/{resource.key} in {self.store.path} was "
                      f"learnt at a {prof.tick_s:g} s tick and rswap now ticks every "
                      f"{self.interval:g} s (daemon.interval): its periods would be "
                      "wrong, so it starts again", file=sys.stderr)
                prof, samples = None, ()
        if prof is None:
            prof = self._new(task, resource)
        for units in samples:
            prof.learn_one(units)
        if self.interval and stored.last_t is not None:
            # the next sample comes one interval after now: the ticks in between were missed
            missed = int(round((time.time() - stored.last_t) / self.interval))
            prof.bridge(min(missed, self._history))
            # start-up (loading BPF...) may take ticks more: the first sample bridges those
            prof.resumed_at = time.time()
        self._since_checkpoint[(task, resource)] = len(stored.samples)
        return prof

    def flush(self, now: float) -> None:
        """Write this tick's samples (one transaction) and checkpoint the series that are due."""
        if self.store is None:
            return
        rows, self._unflushed = self._unflushed, []
        due = []
        for task, r, _ in rows:
            key = (task, r)
            n = self._since_checkpoint.get(key, 0) + 1
            self._since_checkpoint[key] = n
            if n >= self.checkpoint_every:
                due.append(key)
        states = [(t, r.key, freeze(self.profiles[(t, r)]),
                   self.profiles[(t, r)].model_name, self.profiles[(t, r)].mae)
                  for t, r in due if (t, r) in self.profiles]
        self.store.write_tick(now, [(t, r.key, u) for t, r, u in rows], states)
        for key in due:
            self._since_checkpoint[key] = 0

    def checkpoint(self, now: float, task: str | None = None) -> None:
        """Checkpoint every profile (of ``task``) now: on shutdown, or when a task exits."""
        if self.store is None:
            return
        self.flush(now)
        states = [(t, r.key, freeze(p), p.model_name, p.mae)
                  for (t, r), p in self.profiles.items() if task is None or t == task]
        self.store.write_tick(now, [], states)
        for (t, r) in self.profiles:
            if task is None or t == task:
                self._since_checkpoint[(t, r)] = 0

    def get_predicted_needs(self, task: str, window: int) -> dict[Resource, Prediction]:
        """Forecast over the next ``window`` ticks for each resource the task has a profile for."""
        out = {}
        horizon = max(1, window)
        level = self.quantile_level
        for r, prof in self._of(task).items():
            series = prof.forecast(horizon)
            period, confidence, source = prof.season()
            out[r] = Prediction(task, r, tuple(series), max(series), prof.model_name,
                                prof.mae, len(prof.history), quantile(series, level), level,
                                prof.loss, period, confidence, source)
        return out

    def releases(self, task: str) -> dict[Resource, float]:
        """Per resource, how far the allocation floor may drop for ``task``'s next tick, where
        its profile allows it (``AutoForecaster.release``): ``SwapManager.proactive_allocation``
        takes this as its ``releases``."""
        out = {}
        for r, prof in self._of(task).items():
            low = prof.release()
            if low is not None:
                out[r] = low
        return out

    def analyze_task(self, task: str) -> dict[Resource, TaskAnalysis]:
        out = {}
        for r, prof in self._of(task).items():
            if not prof.history:
                continue
            h = prof.history
            out[r] = TaskAnalysis(r, len(h), h[-1], sum(h) / len(h), max(h),
                                  prof.model_name, prof.mae)
        return out

    def forget(self, task: str) -> None:
        """Drop ``task`` from memory; with a store its profile is checkpointed and kept there."""
        if self.store is not None and task in self._by_task:
            import time

            self.checkpoint(time.time(), task)
        for r in self._by_task.pop(task, {}):
            del self.profiles[(task, r)]

    def tasks(self) -> set[str]:
        return {t for t, _ in self.profiles}
