"""Anti-thrashing policy: how fast a task's demand may fall, so allocations do not flip every tick.

The swap manager turns forecasts into demands and shares the pool by tier.  Left alone, a noisy
forecast makes an allocation go up and down each tick, and every change is a cgroup write that
the task feels.  :class:`StabilityPolicy` sits between the two, on *demands* only, so the manager's
guarantees (tiers, minimums, max-min fairness, pool invariants) hold whatever it decides:

- a rise is passed through at once (a latency-critical task must not wait for its burst), at most
  ``max_step_up`` units per tick when that is set;
- a fall within ``deadband`` (a fraction of what the task holds) is ignored: hysteresis;
- a larger fall is applied only after the demand stayed low for ``hold_ticks`` ticks in a row
  (minimum hold time), and then by at most ``max_step_down`` units (or that fraction of the pool
  when below 1) per tick.

>>> from rswap_ebpf.model.resources import ResourceType
>>> p = StabilityPolicy(hold_ticks=2, deadband=0.1, max_step_down=300)
>>> cpu = ResourceType.PROCESSOR_CYCLES
>>> [p.adjust(cpu, 2000, {"a": d}, {"a": held})["a"] for d, held in
...  [(1000, 1000), (950, 1000), (100, 1000), (100, 1000), (100, 1000), (100, 700), (1500, 400)]]
[1000, 1000, 1000, 1000, 700, 400, 1500]
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from rswap_ebpf.errors import ConfigError
from rswap_ebpf.model.resources import ResourceType


@dataclass
class StabilityPolicy:
    hold_ticks: int = 3
    deadband: float = 0.1
    max_step_down: float = 0.25
    max_step_up: float | None = None
    _low_for: dict[tuple[str, ResourceType], int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.hold_ticks < 0:
            raise ConfigError("policy.hold_ticks", "must not be negative")
        if not 0 <= self.deadband < 1:
            raise ConfigError("policy.deadband", "must be in [0, 1)")
        if self.max_step_down <= 0:
            raise ConfigError("policy.max_step_down", "must be positive")
        if self.max_step_up is not None and self.max_step_up <= 0:
            raise ConfigError("policy.max_step_up", "must be positive")

    def _step(self, limit: float, total: int) -> int:
        return max(1, int(limit * total) if limit < 1 else int(limit))

    def adjust(self, r: ResourceType, total: int, demands: Mapping[str, int],
               held: Mapping[str, int]) -> dict[str, int]:
        """The demands to share this tick, given what each task ``held`` before it."""
        out: dict[str, int] = {}
        for name, want in demands.items():
            key = (name, r)
            now = held.get(name, 0)
            if want >= now:
                self._low_for.pop(key, None)
                if self.max_step_up is not None and now > 0:
                    want = min(want, now + self._step(self.max_step_up, total))
                out[name] = want
                continue
            if now - want <= self.deadband * now:
                self._low_for.pop(key, None)
                out[name] = now
                continue
            low = self._low_for.get(key, 0) + 1
            self._low_for[key] = low
            if low <= self.hold_ticks:
                out[name] = now
                continue
            out[name] = max(want, now - self._step(self.max_step_down, total))
        for key in [k for k in self._low_for if k[1] == r and k[0] not in demands]:
            del self._low_for[key]
        return out

    def adjust_columns(self, r: ResourceType, total: int, names: Sequence[str],
                       demands: np.ndarray, held: np.ndarray) -> np.ndarray:
        """:meth:`adjust` over columns: ``demands`` and ``held`` are int64 arrays in ``names``
        order (integers below 2**53, where their comparisons with floats are exact); the
        demands to share in the same order, and the same counters kept."""
        want, now = demands, held
        rise = want >= now
        band = ~rise & ((now - want) <= self.deadband * now)
        falls = np.flatnonzero(~rise & ~band)
        out = want.copy()
        if self.max_step_up is not None:
            m = rise & (now > 0)
            out[m] = np.minimum(want[m], now[m] + self._step(self.max_step_up, total))
        out[band] = now[band]
        old = {}
        for key in [k for k in self._low_for if k[1] == r]:
            old[key[0]] = self._low_for.pop(key)
        if falls.size:
            fall_names = [names[i] for i in falls.tolist()]
            lows = [old.get(n, 0) + 1 for n in fall_names]
            self._low_for.update(zip([(n, r) for n in fall_names], lows))
            held_on = np.array(lows, dtype=np.int64) <= self.hold_ticks
            step = self._step(self.max_step_down, total)
            out[falls] = np.where(held_on, now[falls],
                                  np.maximum(want[falls], now[falls] - step))
        return out

    def forget(self, task: str) -> None:
        for key in [k for k in self._low_for if k[0] == task]:
            del self._low_for[key]
