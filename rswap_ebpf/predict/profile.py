"""Task profiles: per task and resource, a bounded history, a forecaster and its running error.

:class:`TaskProfiler` holds the seed's prediction API: ``analyze_task``, ``update_prediction`` and
``get_predicted_needs``.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..resources import ResourceType
from .forecasters import Forecaster, make_forecaster

DEFAULT_HISTORY = 600


@dataclass(frozen=True)
class Prediction:
    """Forecast of one task's need for one resource over a window of ticks."""

    task: str
    resource: ResourceType
    series: tuple[float, ...]
    peak: float
    model: str
    mae: float | None
    samples: int


@dataclass(frozen=True)
class TaskAnalysis:
    """What ``analyze_task`` reports per resource."""

    resource: ResourceType
    samples: int
    last: float
    mean: float
    peak: float
    model: str
    mae: float | None


class TaskProfile:
    """One task × resource: history, forecaster, and mean absolute error of its 1-step forecasts."""

    def __init__(self, task: str, resource: ResourceType, forecaster: Forecaster,
                 history: int = DEFAULT_HISTORY, error_alpha: float = 0.1):
        self.task = task
        self.resource = resource
        self.forecaster = forecaster
        self.history: deque[float] = deque(maxlen=history)
        self.error_alpha = error_alpha
        self.mae: float | None = None
        self._next: float | None = None

    @property
    def model_name(self) -> str:
        return getattr(self.forecaster, "name", type(self.forecaster).__name__)

    def learn_one(self, y: float) -> None:
        if self._next is not None:
            err = abs(y - self._next)
            self.mae = err if self.mae is None else (
                (1 - self.error_alpha) * self.mae + self.error_alpha * err)
        self.history.append(float(y))
        self.forecaster.learn_one(float(y))
        self._next = self.forecaster.forecast(1)[0]

    def forecast(self, horizon: int) -> list[float]:
        if not self.history:
            return [0.0] * horizon
        return self.forecaster.forecast(horizon)


class TaskProfiler:
    """The profiles of every task, and the seed's prediction functions."""

    def __init__(self, forecaster_factory: Callable[[str, ResourceType], Forecaster] | None = None,
                 history: int = DEFAULT_HISTORY):
        self._factory = forecaster_factory or (lambda task, r: make_forecaster("last_value"))
        self._history = history
        self.profiles: dict[tuple[str, ResourceType], TaskProfile] = {}

    def profile(self, task: str, resource: ResourceType) -> TaskProfile:
        key = (task, resource)
        prof = self.profiles.get(key)
        if prof is None:
            prof = TaskProfile(task, resource, self._factory(task, resource), self._history)
            self.profiles[key] = prof
        return prof

    def update_prediction(self, task: str, resource: ResourceType, units: float) -> None:
        """Feed one observed sample (units used over the last tick)."""
        self.profile(task, resource).learn_one(units)

    def get_predicted_needs(self, task: str, window: int) -> dict[ResourceType, Prediction]:
        """Forecast over the next ``window`` ticks for each resource the task has a profile for."""
        out = {}
        for (t, r), prof in self.profiles.items():
            if t != task:
                continue
            series = prof.forecast(max(1, window))
            out[r] = Prediction(task, r, tuple(series), max(series), prof.model_name,
                                prof.mae, len(prof.history))
        return out

    def analyze_task(self, task: str) -> dict[ResourceType, TaskAnalysis]:
        out = {}
        for (t, r), prof in self.profiles.items():
            if t != task or not prof.history:
                continue
            h = prof.history
            out[r] = TaskAnalysis(r, len(h), h[-1], sum(h) / len(h), max(h),
                                  prof.model_name, prof.mae)
        return out

    def forget(self, task: str) -> None:
        for key in [k for k in self.profiles if k[0] == task]:
            del self.profiles[key]

    def tasks(self) -> set[str]:
        return {t for t, _ in self.profiles}
