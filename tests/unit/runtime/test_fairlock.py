"""FairRLock: the daemon's lock, which a control request must get between two ticks."""
from __future__ import annotations

import threading
import time

import pytest

from rswap_ebpf.runtime.fairlock import FairRLock


def busy(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def waited_while_ticks_run_back_to_back(lock) -> float:
    """Ticks of 0.1 s with no pause between them (they overran their interval); a request that
    asks for the lock during the first one: how long it waited."""
    waited: list[float] = []
    started = threading.Event()

    def request():
        started.set()
        t0 = time.monotonic()
        with lock:
            waited.append(time.monotonic() - t0)

    t = None
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        with lock:
            if t is None:
                t = threading.Thread(target=request)
                t.start()
                started.wait()
            busy(0.1)
    t.join()
    return waited[0]


def test_a_waiting_request_gets_the_lock_after_the_current_tick():
    assert waited_while_ticks_run_back_to_back(FairRLock()) < 0.5


def test_reentrant_and_only_its_holder_may_release():
    lock = FairRLock()
    with lock:
        with lock:
            assert lock.held()
        assert lock.held()
        errors = []

        def other():
            try:
                lock.release()
            except RuntimeError as err:
                errors.append(err)

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert errors
    assert not lock.held()
    with pytest.raises(RuntimeError):
        lock.release()
