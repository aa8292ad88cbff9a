"""When and how much to protect the critical tier from lower tiers on the CPU (pure logic).

The base layer is the kernel's weights (a critical cgroup's shares/weight at the top, batch's at
the bottom, no quota on either): work-conserving, and on its own already close to what a
critical task gets alone.  What weights cannot stop is batch work running *beside* a request on
the same core (its caches, its time slice when the request wakes).  Taking cores away from
batch does, but costs batch whatever the critical tier leaves unused on those cores, so it pays
only while the critical tier would use most of them anyway: during its bursts.

- *When* comes from prediction: the critical tier's use per tick is kept for
  ``history_ticks``; when it repeats with a period (autocorrelation), the next tick's use is
  the one a period ago, and a tick forecast at ``above_millicores`` or more is protected before
  it starts.
- *How much* comes from feedback, the critical tier's run-queue delay (host.cpu.runq): a tick
  whose p99 delay is over ``runq_target_us`` while the tier used ``full_millicores`` (most of a
  core) protects the next tick even without a forecast; one that stays over target while
  protected takes one core more (on hosts with cores to spare).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

#: defaults of ``[resources.cpu] critical_isolate_above`` and the feedback's thresholds
ABOVE_DEFAULT = 500.0
FULL_DEFAULT = 900.0
RUNQ_TARGET_US = 1000.0


def find_period(series: list[float], min_corr: float = 0.6, min_cv: float = 0.2) -> int:
    """The lag (ticks) at which ``series`` best repeats, or 0: none strong enough.

    A lag must be seen twice over (``len >= 2 * lag``) and the series' tick-to-tick changes
    must correlate at ``min_corr`` or more at it (changes, not levels: a ramp's levels
    correlate at every short lag, its changes at none); a flat series (coefficient of variation
    below ``min_cv``) has no period worth protecting.

    >>> find_period([0, 0, 0, 9, 9, 0, 0, 0] * 4)
    8
    >>> find_period([5.0, 5.1, 4.9, 5.0] * 8)
    0
    """
    n = len(series)
    if n < 6:
        return 0
    mean = sum(series) / n
    if mean <= 0 or math.sqrt(sum((x - mean) ** 2 for x in series) / n) / mean < min_cv:
        return 0
    steps = [b - a for a, b in zip(series, series[1:])]
    n = len(steps)
    smean = sum(steps) / n
    dev = [x - smean for x in steps]
    var = sum(d * d for d in dev)
    if var <= 0:
        return 0
    best, best_corr = 0, min_corr
    for lag in range(2, n // 2 + 1):
        c = sum(dev[i] * dev[i - lag] for i in range(lag, n)) / var * n / (n - lag)
        if c > best_corr + 1e-9:
            best, best_corr = lag, c
    return best


@dataclass
class ProtectionPolicy:
    """The critical tier's millicores the lower tiers should leave free next tick (0: none).

    >>> p = ProtectionPolicy()
    >>> [round(p.update(u, 50.0)) for u in [50, 50, 50, 50, 50, 50, 800, 800] * 3][16:]
    [0, 0, 0, 0, 0, 800, 800, 0]
    """

    above_millicores: float = ABOVE_DEFAULT
    full_millicores: float = FULL_DEFAULT
    runq_target_us: float = RUNQ_TARGET_US
    history_ticks: int = 64
    period: int = 0
    protected: float = 0.0
    _use: deque = field(default_factory=deque, repr=False)

    def predicted_next(self) -> float | None:
        """The next tick's critical use from the period found, or None without one."""
        h = list(self._use)
        self.period = find_period(h)
        if not self.period:
            return None
        return h[-self.period]

    def update(self, use_mc: float, runq_p99_us: float | None) -> float:
        """Record this tick's critical use and delay; the millicores to protect next tick."""
        self._use.append(max(0.0, float(use_mc)))
        while len(self._use) > self.history_ticks:
            self._use.popleft()
        pred = self.predicted_next()
        want = pred if pred is not None and pred >= self.above_millicores else 0.0
        hurt = runq_p99_us is not None and runq_p99_us > self.runq_target_us
        if hurt and use_mc >= self.full_millicores:
            want = max(want, use_mc)            # no forecast saw it: protect the burst under way
        if hurt and self.protected and want:
            want += 1000.0                      # protected and still delayed: one core more
        self.protected = want
        return want
