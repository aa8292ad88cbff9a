"""When the cyclic garbage collector runs in the daemon.

Almost everything a running daemon holds is long-lived: per task and resource a profile, its
history and forecaster, the pool's allocations.  CPython's collector counts container
allocations and, by default, scans the youngest generation every 700 of them and everything
now and then.  A tick at 10,000 tasks x 6 resources allocates hundreds of thousands of
short-lived containers (per-task dicts, tuples, changes), so the collector ran hundreds of times
a tick and its full scans walked every profile again: a third of the tick went there.

:class:`GcPolicy` does what large Python services do (``gc.freeze`` after start-up): once the
long-lived state has grown (the first tick makes every profile), it collects once and moves
what is left into the permanent generation, which later collections do not scan; and it lets
``young`` allocations pass between young collections.  Objects are still freed by reference
counting as before; only cycles wait longer to be collected.
"""
from __future__ import annotations

import gc


class GcPolicy:
    """``after_tick(n)``: ``n`` is a count of the long-lived objects (profiles); when it has
    grown by ``grow`` (a fraction) since the last freeze, collect and freeze again."""

    def __init__(self, young: int = 50_000, grow: float = 0.25, least: int = 1_000):
        self.young, self.grow, self.least = young, grow, least
        self.frozen_at = 0
        self._set = False

    def start(self) -> None:
        if not self._set:
            _, mid, old = gc.get_threshold()
            gc.set_threshold(max(self.young, gc.get_threshold()[0]), mid, old)
            self._set = True

    def after_tick(self, long_lived: int) -> bool:
        """True when it collected and froze now."""
        self.start()
        if long_lived < self.least or long_lived <= self.frozen_at * (1 + self.grow):
            return False
        gc.collect()
        gc.freeze()
        self.frozen_at = long_lived
        return True
