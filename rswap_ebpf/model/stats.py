"""The one quantile helper every layer uses (profiles, admission, replay's VPA, benchmarks)."""
from __future__ import annotations

import math
from collections.abc import Iterable

METHODS = ("linear", "lower", "higher")


def quantile(values: Iterable[float], q: float, method: str = "linear") -> float:
    """The ``q`` quantile of ``values`` (0.0 when there are none), as ``numpy.quantile`` with
    the same ``method``: ``linear`` reads between the two nearest order statistics, ``lower``
    and ``higher`` take the one below or above (a value the series really held, as an
    admission estimate or a VPA-style recommender wants).

    >>> xs = [1, 2, 3, 4, 10]
    >>> quantile(xs, 0.875), quantile(xs, 0.875, "lower"), quantile(xs, 0.875, "higher")
    (7.0, 4, 10)
    >>> quantile([], 0.5)
    0.0
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be between 0 and 1, not {q!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    xs = sorted(values)
    if not xs:
        return 0.0
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1) if pos > lo else lo
    if method == "lower":
        return xs[lo]
    if method == "higher":
        return xs[hi]
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
