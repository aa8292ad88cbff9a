"""What online selection chooses from and how it scores them: the candidate names, the
combinations, the losses, and a candidate's recent error as it is reported."""
from __future__ import annotations

from dataclasses import dataclass

CANDIDATES = ("last_value", "seasonal_naive", "seasonal_ewma", "seasonal_fractional",
              "seasonal_level", "holt_winters", "snarimax", "quantile_lags", "seasonal_long",
              "seasonal_long_avg", "median", "blend")
#: candidates that follow the long season (:mod:`~.longseason`: found on the profile's rolled-up
#: buckets, beyond ``max_period``): the last period's phase, and the mean of the last three
LONG_CANDIDATES = ("seasonal_long", "seasonal_long_avg")
#: not models of their own: combinations of the other candidates' point forecasts, scored like
#: them, so selection can pick a combination where no single model is reliably best.  ``median``:
#: per step, the median; ``blend``: per step, the forecasts of the BLEND_TOP models with the least
#: recent error at that step, weighted by the inverse square of that error (a forecast
#: combination, which can beat every model in it)
COMBINERS = ("median", "blend")
#: the blend combines the few models with the least recent error at each step: a trimmed
#: combination (a model that has gone badly wrong gets no say at all, not merely a small one)
BLEND_TOP = 3
LOSSES = ("pinball", "mae")
#: candidates that forecast the last value when no period has been found
_LAST_VALUE_WITHOUT_PERIOD = ("last_value", "seasonal_naive", "seasonal_fractional",
                              "seasonal_level")
_HALF_MAX = 65504.0  # the largest finite half-precision float


@dataclass(frozen=True)
class CandidateError:
    """A candidate's recent errors: the selection loss and the 1-step MAE, over ``samples``."""

    model: str
    loss: float | None
    mae: float | None
    samples: int


def _median(xs) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def pinball(y: float, f: float, q: float) -> float:
    return q * (y - f) if y >= f else (1.0 - q) * (f - y)
