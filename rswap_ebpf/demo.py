"""Demo workloads for ``rswap run``'s embedded configuration and the tests.

``burst``: every ``--period`` seconds, ``--workers`` processes spin for ``--busy`` seconds (at
``--duty`` of each 10 ms slice), then sleep: a latency-critical service's periodic peak.
``spin``: ``--workers`` processes spin forever: a batch job that takes whatever it is given.

Workers die with their parent (PR_SET_PDEATHSIG), and everything stops on SIGTERM/SIGINT or after
``--seconds``, so a demo can never outlive the run that started it.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
import time

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _spin_until(deadline: float, duty: float) -> None:
    while True:
        now = time.monotonic()
        if now >= deadline:
            return
        slice_end = min(deadline, now + 0.01 * duty)
        while time.monotonic() < slice_end:
            pass
        if duty < 1.0:
            time.sleep(0.01 * (1.0 - duty))


def _burst(period: float, busy: float, duty: float, stop_at: float) -> None:
    # Phase-locked to the wall clock, so every worker bursts together.
    while time.monotonic() < stop_at:
        phase = time.time() % period
        if phase < busy:
            _spin_until(time.monotonic() + (busy - phase), duty)
        else:
            time.sleep(min(period - phase, max(0.0, stop_at - time.monotonic())))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rswap_ebpf.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["burst", "spin"])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--period", type=float, default=12.0)
    p.add_argument("--busy", type=float, default=4.0)
    p.add_argument("--duty", type=float, default=1.0)
    p.add_argument("--seconds", type=float, default=3600.0, help="stop after this long")
    a = p.parse_args(argv)
    stop_at = time.monotonic() + a.seconds
    children = []
    for _ in range(max(1, a.workers)):
        pid = os.fork()
        if pid == 0:
            _die_with_parent()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            try:
                if a.mode == "spin":
                    _spin_until(stop_at, a.duty)
                else:
                    _burst(a.period, a.busy, a.duty, stop_at)
            except KeyboardInterrupt:
                pass
            os._exit(0)
        children.append(pid)

    def stop(signum, frame):
        for c in children:
            try:
                os.kill(c, signal.SIGTERM)
            except ProcessLookupError:
                pass
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for c in children:
        os.waitpid(c, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
