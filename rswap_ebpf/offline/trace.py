"""The record format: what the collectors saw, as plain CSV that pandas or a spreadsheet reads.

One header line, then one row per task, resource and tick::

    time,task,resource,units
    1.002,web,cpu,1487.3
    1.002,batch,cpu,498.1

``time`` is seconds since the recording started (float); ``task`` the configured task name;
``resource`` a resource key (``cpu``, ``io``, ``net``, ..., ``coproc:NAME`` for a named
co-processor); ``units`` what the task used over the tick ending at ``time``, in that resource's
unit (millicores for cpu).
Rows of one tick share the same ``time``.  ``pandas.read_csv(path)`` gives a tidy frame;
``df.pivot_table(index="time", columns=["task", "resource"], values="units")`` a wide one.
"""
from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO

from rswap_ebpf.errors import ConfigError
from rswap_ebpf.model.resources import Resource, parse_resource

HEADER = ("time", "task", "resource", "units")


@dataclass(frozen=True)
class Trace:
    """A trace aligned on its ticks: ``demand[(task, resource)][i]`` is units at ``times[i]``."""

    times: tuple[float, ...]
    demand: dict[tuple[str, Resource], tuple[float, ...]]
    source: str = ""

    @property
    def interval(self) -> float:
        if len(self.times) < 2:
            return 1.0
        gaps = sorted(b - a for a, b in zip(self.times, self.times[1:]))
        return gaps[len(gaps) // 2] or 1.0

    @property
    def tasks(self) -> list[str]:
        return sorted({t for t, _ in self.demand})

    @property
    def resources(self) -> list[Resource]:
        return sorted({r for _, r in self.demand}, key=lambda r: r.key)


class TraceWriter:
    """Appends rows and flushes each tick, so a recording stopped with Ctrl-C is still whole."""

    def __init__(self, stream: IO[str]):
        self.stream = stream
        self._csv = csv.writer(stream, lineterminator="\n")
        self._csv.writerow(HEADER)

    def write_tick(self, time_s: float, rows: Iterable[tuple[str, Resource, float]]) -> int:
        n = 0
        for task, r, units in rows:
            self._csv.writerow((f"{time_s:.3f}", task, r.key, f"{units:.1f}"))
            n += 1
        self.stream.flush()
        return n


def read_trace(path: str) -> Trace:
    """Parse a trace; a bad line is a ConfigError naming ``path:line``."""
    try:
        f = open(path, newline="", encoding="utf-8")
    except OSError as err:
        raise ConfigError("TRACE", f"cannot read {path}: {err.strerror}") from None
    try:
        with f:
            rows = _read_rows(path, csv.reader(f))
    except UnicodeDecodeError as err:
        raise ConfigError(path, f"not UTF-8 text (byte {err.start} of a read block)") from None
    except csv.Error as err:  # a field over csv's limit, a NUL byte...
        raise ConfigError(path, f"not a CSV trace: {err}") from None
    if not rows:
        raise ConfigError(path, "the trace has no samples")
    times = tuple(sorted(rows))
    keys = sorted({k for per in rows.values() for k in per}, key=lambda k: (k[0], k[1].key))
    # A task absent from a tick (not started yet, or gone) used nothing then.
    demand = {k: tuple(rows[t].get(k, 0.0) for t in times) for k in keys}
    return Trace(times, demand, path)


def _read_rows(path: str, reader) -> dict[float, dict[tuple[str, Resource], float]]:
    """Time -> (task, resource) -> units; a bad line is a ConfigError naming ``path:line``."""
    rows: dict[float, dict[tuple[str, Resource], float]] = {}
    header = next(reader, None)
    if header is None or tuple(h.strip() for h in header) != HEADER:
        raise ConfigError(f"{path}:1", f"expected the header {','.join(HEADER)}")
    for lineno, row in enumerate(reader, start=2):
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != 4:
            raise ConfigError(f"{path}:{lineno}", f"expected 4 fields, got {len(row)}")
        try:
            t, units = float(row[0]), float(row[3])
        except ValueError:
            raise ConfigError(f"{path}:{lineno}", "time and units must be numbers") from None
        if not (math.isfinite(t) and math.isfinite(units)) or units < 0:
            raise ConfigError(f"{path}:{lineno}", "time and units must be finite, units >= 0")
        r = parse_resource(row[2], f"{path}:{lineno}.resource")
        rows.setdefault(t, {})[(row[1], r)] = units
    return rows
