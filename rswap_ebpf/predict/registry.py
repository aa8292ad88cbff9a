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


def make_forecaster(spec: str | dict | None, scale: float = 1.0, field: str = "forecaster"):
    """Build a forecaster from configuration: a name, or a table with ``name`` and parameters."""
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
    try:
        return factory(**params)
    except TypeError as err:
        raise ConfigError(field, f"bad parameters for {name}: {err}") from None
    except ValueError as err:
        raise ConfigError(field, f"bad parameters for {name}: {err}") from None
    except ConfigError as err:
        raise ConfigError(f"{field}.{err.field.rsplit('.', 1)[-1]}", err.message) from None
