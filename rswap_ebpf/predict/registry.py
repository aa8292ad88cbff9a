"""Forecasters by name: what a configuration's ``forecaster = ...`` builds."""
from __future__ import annotations

from rswap_ebpf.errors import ConfigError
from rswap_ebpf.predict.forecasters import (LastValue, QuantileLags, SeasonalEWMA,
                                            SeasonalFractional, SeasonalLevel, SeasonalNaive,
                                            holt_winters, snarimax)
from rswap_ebpf.predict.selection import AutoForecaster

_FACTORIES = {
    "last_value": LastValue,
    "seasonal_naive": SeasonalNaive,
    "seasonal_ewma": SeasonalEWMA,
    "seasonal_fractional": SeasonalFractional,
    "seasonal_level": SeasonalLevel,
    "holt_winters": holt_winters,
    "snarimax": snarimax,
    "quantile_lags": QuantileLags,
    "auto": AutoForecaster,
}


def available() -> list[str]:
    return sorted(_FACTORIES)


#: forecasters whose memory is sized in seconds (the selection's rolled-up buckets): they take
#: the tick length, ``tick_s``, from whoever ticks them
_TICKED = (AutoForecaster,)


def make_forecaster(spec: str | dict | None, scale: float = 1.0, field: str = "forecaster",
                    tick_s: float | None = None):
    """Build a forecaster from configuration: a name, or a table with ``name`` and parameters.

    ``tick_s``: the seconds between samples (the daemon's interval, a trace's), given to the
    forecasters that keep seconds-wide buckets; a spec that names another tick length is refused,
    since its buckets would cover the wrong time.

    >>> make_forecaster("auto", tick_s=0.5).rollups.widths[:2]  # 10 s and 1 min, in ticks
    (20, 120)
    """
    if spec is None:
        spec = "auto"
    if isinstance(spec, str):
        name, params = spec, {}
    elif isinstance(spec, dict):
        params = dict(spec)
        name = params.pop("name", None)
        if not isinstance(name, str):
            raise ConfigError(f"{field}.name", "missing (one of: " + ", ".join(available()) + ")")
    else:
        raise ConfigError(field, f"expected a name or a table, got {spec!r}")
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ConfigError(field, f"unknown forecaster {name!r} (known: {', '.join(available())})")
    if factory in (holt_winters, snarimax, AutoForecaster):
        params.setdefault("scale", scale)
    if tick_s is not None and factory in _TICKED:
        given = params.get("tick_s", tick_s)
        if not isinstance(given, (int, float)) or isinstance(given, bool) or \
                abs(float(given) - float(tick_s)) > 1e-6 * float(tick_s):
            raise ConfigError(f"{field}.tick_s", f"{given!r} is not the tick length here "
                              f"({float(tick_s):g} s: daemon.interval, or the trace's); "
                              "leave tick_s out, it is set from the interval")
        params["tick_s"] = float(tick_s)
    try:
        return factory(**params)
    except TypeError as err:
        raise ConfigError(field, f"bad parameters for {name}: {err}") from None
    except ValueError as err:
        raise ConfigError(field, f"bad parameters for {name}: {err}") from None
    except ConfigError as err:
        raise ConfigError(f"{field}.{err.field.rsplit('.', 1)[-1]}", err.message) from None
