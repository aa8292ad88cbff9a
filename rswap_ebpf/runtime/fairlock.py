"""A re-entrant lock handed to waiters in the order they asked for it.

The daemon's tick loop and its control-socket thread share one lock.  ``threading.RLock`` is not
fair: when ticks overrun their interval the loop releases and re-takes it at once, and a control
request waiting on it starved until the run ended (seen on an emulated guest, tools/vm_test:
``rswap exec`` got no answer in 30 s while 40 ticks ran).  With tickets, a request that arrives
during a tick is served right after that tick.
"""
from __future__ import annotations

import threading


class FairRLock:
    """``with lock:`` like ``threading.RLock``, granted first come, first served.

    >>> lock = FairRLock()
    >>> with lock:
    ...     with lock:
    ...         lock.held()
    True
    >>> lock.held()
    False
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self._next_ticket = 0
        self._serving = 0

    def acquire(self) -> bool:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return True
            ticket = self._next_ticket
            self._next_ticket += 1
            while self._owner is not None or self._serving != ticket:
                self._cond.wait()
            self._owner, self._depth = me, 1
            self._serving += 1
            return True

    def release(self) -> None:
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("cannot release a FairRLock this thread does not hold")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()

    def held(self) -> bool:
        """Whether the calling thread holds the lock."""
        return self._owner == threading.get_ident()

    __enter__ = acquire

    def __exit__(self, *exc) -> None:
        self.release()
