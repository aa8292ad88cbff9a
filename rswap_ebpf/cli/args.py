"""Argument types shared by every ``rswap`` subcommand: one validator for each kind of value."""
from __future__ import annotations

import argparse
import json
import os

from rswap_ebpf.errors import ConfigError, RswapError
from rswap_ebpf.model.checks import check_number, check_whole


def _number_text(text: str, convert, what: str):
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def _checked(check, *args):
    """The shared check (model/checks.py), its message as argparse prints one."""
    try:
        return check(*args)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(err.message) from None


def seconds(lo: float = 0.0, hi: float | None = None):
    """An argparse type for a number of seconds in ``[lo, hi]``."""

    def parse(text: str) -> float:
        return _checked(check_number, _number_text(text, float, "seconds"), "seconds", lo, hi)

    return parse


#: a tick interval: 50 ms to an hour
interval = seconds(0.05, 3600)


def count(text: str) -> int:
    """A whole number of at least 1 (ticks, refreshes)."""
    return _checked(check_whole, _number_text(text, int, "a whole number"), "count", 1)


def port(text: str) -> int:
    """A TCP port, 0 (any free one) to 65535."""
    v = _number_text(text, int, "a TCP port")
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 0 and 65535, got {text}")
    return v


def limit(text: str) -> tuple[str, str]:
    """``cpu=500`` or ``500`` (CPU millicores)."""
    key, sep, value = text.partition("=")
    if not sep:
        key, value = "cpu", text
    if not key or not value:
        raise argparse.ArgumentTypeError(f"expected RESOURCE=UNITS (cpu=500), got {text!r}")
    return key.strip(), value.strip()


def forecaster(text: str):
    """A forecaster name, or a JSON table with ``name`` and its parameters."""
    if text.strip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from None
    return text


def need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise RswapError(f"rswap {what} needs root (it loads BPF and writes cgroups); "
                         "run it as root")
