"""``rswap plot``: per task, usage vs forecast vs allocation over time, with swaps marked.

Inputs (see ``rswap plot --help``):

* a status history, JSON lines of :meth:`Daemon.status` documents (``rswap run --history FILE``);
* a CSV with the header ``time,task,resource,usage,forecast,allocation`` and an optional ``swap``
  column (``+N`` received N units, ``-N`` gave N units); time in seconds;
* a recorded trace ``time,task,resource,units`` (usage only: nothing to compare it with).

Each panel's title says how often allocation covered usage, the question the plot answers.
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from rswap_ebpf.errors import ConfigError


@dataclass
class Series:
    task: str
    resource: str
    unit: str = "units"
    time: list[float] = field(default_factory=list)
    usage: list[float] = field(default_factory=list)
    forecast: list[float] = field(default_factory=list)
    allocation: list[float] = field(default_factory=list)

    def covered(self) -> float | None:
        """Fraction of samples where the allocation was at least the usage."""
        pairs = [(u, a) for u, a in zip(self.usage, self.allocation) if not math.isnan(a)]
        if not pairs:
            return None
        return sum(u <= a for u, a in pairs) / len(pairs)


@dataclass(frozen=True)
class SwapMark:
    time: float
    resource: str
    task: str
    units: float  # > 0 received, < 0 given


@dataclass
class History:
    series: dict[tuple[str, str], Series] = field(default_factory=dict)
    swaps: list[SwapMark] = field(default_factory=list)

    def get(self, task: str, resource: str, unit: str = "units") -> Series:
        s = self.series.get((task, resource))
        if s is None:
            s = self.series[(task, resource)] = Series(task, resource, unit)
        return s


def load_history(path: str) -> History:
    """Read a status history (JSON lines) or a CSV; the format is told by the first line."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise ConfigError("TRACE_OR_STATE", f"cannot read {path}: {err.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"{path}:{line}", f"not UTF-8 text (byte 0x{raw[err.start]:02x}); "
                          "expected a status history (.jsonl) or a CSV") from None
    f = io.StringIO(text, newline=None)
    if text.lstrip().startswith("{"):
        return _from_status_lines(f, path)
    return _from_csv(f, path)


def _from_status_lines(lines: Iterable[str], path: str) -> History:
    h = History()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            st = json.loads(line)
            t = float(st["time"])
            units = {k: r.get("unit", "units") for k, r in st.get("pool", {}).items()}
            for task, info in st.get("tasks", {}).items():
                if info.get("exited") is not None:
                    continue
                for res, v in info.get("resources", {}).items():
                    s = h.get(task, res, units.get(res, "units"))
                    s.time.append(t)
                    s.usage.append(float(v["usage"]))
                    s.forecast.append(float(v["forecast"]))
                    s.allocation.append(float(v["allocation"]))
            for sw in st.get("swaps", ()):
                h.swaps.append(SwapMark(t, sw["resource"], sw["to"], float(sw["units"])))
                h.swaps.append(SwapMark(t, sw["resource"], sw["from"], -float(sw["units"])))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as err:
            raise ConfigError(f"{path}:{n}", f"not a status document: {err!r}") from None
    return _checked(h, path)


def _num(text: str | None) -> float:
    return float(text) if text not in (None, "") else math.nan


def _from_csv(f, path: str) -> History:
    reader = csv.DictReader(f)
    cols = set(reader.fieldnames or ())
    full = {"time", "task", "resource", "usage", "forecast", "allocation"}
    record = {"time", "task", "resource", "units"}
    if not (full <= cols or record <= cols):
        raise ConfigError(path, f"CSV columns {sorted(cols)}: expected {','.join(sorted(full))} "
                          "(optionally swap), or a recorded trace time,task,resource,units")
    h = History()
    for n, row in enumerate(reader, 2):
        try:
            t = float(row["time"])
            s = h.get(row["task"], row["resource"], _unit(row["resource"]))
            s.time.append(t)
            if full <= cols:
                s.usage.append(float(row["usage"]))
                s.forecast.append(_num(row["forecast"]))
                s.allocation.append(_num(row["allocation"]))
                if row.get("swap"):
                    h.swaps.append(SwapMark(t, row["resource"], row["task"], float(row["swap"])))
            else:
                s.usage.append(float(row["units"]))
                s.forecast.append(math.nan)
                s.allocation.append(math.nan)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{path}:{n}", f"bad row {row}: {err}") from None
    return _checked(h, path)


def _unit(resource: str) -> str:
    from rswap_ebpf.model.resources import parse_resource

    try:
        return parse_resource(resource).unit
    except ConfigError:
        return "units"


def _checked(h: History, path: str) -> History:
    if not h.series:
        raise ConfigError(path, "no samples in it")
    return h


def render(h: History, output: str, resource: str | None = None, tasks: list[str] | None = None,
           title: str | None = None) -> list[tuple[str, str]]:
    """Draw one panel per task and resource into ``output``; returns the panels drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in sorted(h.series) if (resource is None or k[1] == resource)
            and (not tasks or k[0] in tasks)]
    if not keys:
        raise ConfigError("--task/--resource", "no series match "
                          f"(have: {', '.join(f'{t}/{r}' for t, r in sorted(h.series))})")
    t0 = min(min(h.series[k].time) for k in keys)
    fig, axes = plt.subplots(len(keys), 1, figsize=(10, 2.6 * len(keys) + 0.6), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        s = h.series[key]
        x = [t - t0 for t in s.time]
        ax.plot(x, s.usage, color="tab:blue", lw=1.6, label="usage")
        if not all(math.isnan(v) for v in s.forecast):
            ax.plot(x, s.forecast, color="tab:orange", lw=1.2, ls="--", label="forecast")
        if not all(math.isnan(v) for v in s.allocation):
            ax.step(x, s.allocation, where="post", color="tab:green", lw=1.8, label="allocation")
        for sw in h.swaps:
            if sw.task != s.task or sw.resource != s.resource:
                continue
            received = sw.units > 0
            ax.axvline(sw.time - t0, color="tab:red" if received else "tab:gray", lw=0.8, alpha=0.5)
            y = _at(s, sw.time)
            ax.plot([sw.time - t0], [y], marker="^" if received else "v", ms=8, ls="none",
                    color="tab:red" if received else "tab:gray")
        covered = s.covered()
        note = "" if covered is None else f" - allocation covered usage in {covered:.0%} of ticks"
        ax.set_title(f"{s.task} / {s.resource}{note}", fontsize=10, loc="left")
        ax.set_ylabel(s.unit)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="tab:blue", lw=1.6, label="usage"),
               Line2D([], [], color="tab:orange", ls="--", label="forecast"),
               Line2D([], [], color="tab:green", lw=1.8, label="allocation"),
               Line2D([], [], color="tab:red", marker="^", ls="none", label="swap: received"),
               Line2D([], [], color="tab:gray", marker="v", ls="none", label="swap: gave")]
    fig.legend(handles=handles, loc="upper right", ncol=5, fontsize=8, frameon=False)
    axes[-1, 0].set_xlabel("seconds")
    fig.suptitle(title or "rswap: did allocation lead demand?", x=0.01, ha="left", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    try:
        fig.savefig(output, dpi=100)
    except (OSError, ValueError) as err:
        raise ConfigError("--output", f"cannot write {output}: {err}") from None
    finally:
        plt.close(fig)
    return keys


def _at(s: Series, t: float) -> float:
    """The allocation (else usage) at time ``t``: where a swap marker sits."""
    best = 0
    for i, ti in enumerate(s.time):
        if ti <= t:
            best = i
    a = s.allocation[best]
    return s.usage[best] if math.isnan(a) else a
