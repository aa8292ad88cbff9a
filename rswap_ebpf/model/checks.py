"""The value checks every input path shares: the config file, the control socket, forecaster
parameters and (through ``cli/args.py``) the command line.  Each raises ``ConfigError`` naming
the field, so a bad value reads the same wherever it came from.

>>> check_number(0.5, "daemon.interval", 0.05, 3600)
0.5
>>> check_whole(3, "forecaster.release_after")
3
"""
from __future__ import annotations

from typing import Any

from rswap_ebpf.errors import ConfigError


def check_number(value: Any, field_name: str, lo: float, hi: float | None = None) -> float:
    """A real number (not a bool, not NaN) in ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(field_name, f"expected a number, got {value!r}")
    if value != value or value < lo or (hi is not None and value > hi):
        bound = f"between {lo:g} and {hi:g}" if hi is not None else f"at least {lo:g}"
        raise ConfigError(field_name, f"must be {bound}, got {value!r}")
    return float(value)


def check_whole(value: Any, field_name: str, lo: int = 0) -> int:
    """A whole number (an int, not a bool) of at least ``lo``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(field_name, f"must be a whole number, {lo} or more, got {value!r}")
    return value


def check_bool(value: Any, field_name: str) -> bool:
    """``true`` or ``false`` themselves: the string "false" must not read as true."""
    if not isinstance(value, bool):
        raise ConfigError(field_name, f"expected true or false, got {value!r}")
    return value


def check_fraction(value: Any, field_name: str) -> float:
    """A number strictly between 0 and 1 (a quantile level)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(field_name, f"expected a number between 0 and 1, got {value!r}") from None
    if isinstance(value, bool) or not 0.0 < v < 1.0:
        raise ConfigError(field_name, "must be between 0 and 1 (exclusive)")
    return v
