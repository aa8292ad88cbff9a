"""Argument types shared by every ``rswap`` subcommand: one validator for each kind of value."""
from __future__ import annotations

import argparse
import json
import os

from rswap_ebpf.errors import RswapError


def seconds(lo: float = 0.0, hi: float | None = None):
    """An argparse type for a number of seconds in ``[lo, hi]``."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
        if v != v or v < lo or (hi is not None and v > hi):
            span = f"between {lo:g} and {hi:g} seconds" if hi is not None else \
                f"at least {lo:g} seconds"
            raise argparse.ArgumentTypeError(f"must be {span}, got {text}")
        return v

    return parse


#: a tick interval: 50 ms to an hour
interval = seconds(0.05, 3600)


def count(text: str) -> int:
    """A whole number of at least 1 (ticks, refreshes)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
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
