"""``rswap top``: a live view of the running daemon, tasks x resources, like ``top``.

It reads the status file the daemon rewrites each tick (``RUN_DIR/status.json``), so it needs no
root, loads nothing, and cannot disturb the daemon.  A row is red when a task uses more than it is
allocated (allocation did not lead demand) and yellow when its forecast is above its allocation
(the pool could not grant what was forecast).
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

from rich.console import Console, Group
from rich.text import Text

from rswap_ebpf.cli.format import Column, column_widths, fmt_model, fmt_units, format_row, header
from rswap_ebpf.errors import RswapError

COLUMNS = (Column("TASK"), Column("PRIO"), Column("RES"), Column("USAGE", ">"),
           Column("FORECAST", ">"), Column("ALLOC", ">"), Column("SHORT", ">"),
           Column("MODEL p=PERIOD/CONF (MAE)"))


def read_status() -> dict[str, Any]:
    """The running daemon's last status, or an error saying none is running.

    Needs no root: the status file is readable by everyone.  Whether the daemon still runs is
    asked of its lock where we may open it (root), else of the pid the status names.
    """
    from rswap_ebpf.runtime.status import status_path

    path = status_path()
    try:
        with open(path) as f:
            status = json.load(f)
    except FileNotFoundError:
        raise RswapError(NOT_RUNNING) from None
    except PermissionError:
        raise RswapError(f"cannot read {path}: permission denied (run as root)") from None
    except (OSError, ValueError) as err:
        raise RswapError(f"cannot read {path}: {err}") from None
    if not isinstance(status, dict) or not _running(status):
        raise RswapError(NOT_RUNNING)
    return status


NOT_RUNNING = "no rswap daemon is running (start one as root with: rswap run)"


def _running(status: Mapping[str, Any]) -> bool:
    from rswap_ebpf.runtime.lock import Lock

    try:
        return Lock.held()
    except PermissionError:  # the lock is root's (mode 0600): ask about the pid instead
        pass
    pid = status.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, and root's
    # a daemon killed with -9 leaves its status behind, and its pid may be reused: a live
    # daemon rewrites the file every tick
    interval = status.get("interval")
    interval = float(interval) if isinstance(interval, (int, float)) else 1.0
    age = time.time() - float(status.get("time", 0) or 0)
    return age <= max(STALE_AFTER_S, 10 * interval)


#: a status file older than this (and ten ticks) is a dead daemon's, where the lock cannot say
STALE_AFTER_S = 60.0


def render(status: Mapping[str, Any], now: float | None = None,
           runq: Mapping[str, Any] | None = None) -> Group:
    """One frame: a header (daemon, pool), the tasks x resources table, and where the CPU
    driver measures it, each task's run-queue delay (RUNQ p99: runnable to running)."""
    now = time.time() if now is None else now
    age = max(0.0, now - status.get("time", now))
    units = {k: r.get("unit", "units") for k, r in status.get("pool", {}).items()}
    head = Text(f"rswap pid {status.get('pid', '?')}  tick {status.get('tick', 0)}  "
                f"every {status.get('interval', 0):g}s  updated {age:.1f}s ago"
                + ("  (dry run)" if status.get("dry_run") else ""), style="bold")
    pool = Text("pool: " + ",  ".join(
        f"{k} {fmt_units(r['available'], r['unit'])} free of {fmt_units(r['total'], r['unit'])}"
        for k, r in status.get("pool", {}).items()))
    columns = COLUMNS + ((Column("RUNQ p99", ">"),) if runq else ())
    delay = (runq or {}).get("tasks", {})
    rows: list[tuple[list[str], str]] = []
    short = {(s["task"], s["resource"]): s["wanted"] - s["granted"] for s in status.get("shortfalls", ())}
    for name, t in status.get("tasks", {}).items():
        if t.get("exited") is not None:
            rows.append(([name, t.get("priority", ""), "", "", "", "", "", f"exited ({t['exited']})"]
                         + ([""] if runq else []), "dim"))
            continue
        for res, v in t.get("resources", {}).items():
            unit = units.get(res, "units")
            style = ""
            if v.get("usage", 0) > v.get("allocation", 0):
                style = "red"
            elif v.get("forecast", 0) > v.get("allocation", 0):
                style = "yellow"
            model = fmt_model(v, unit)
            missing = short.get((name, res))
            rq = []
            if runq:
                d = delay.get(name, {})
                rq = [f"{d['p99_us'] / 1000:.2f}ms" if res == "cpu" and d.get("n") else ""]
            rows.append(([name, t.get("priority", ""), res, fmt_units(v.get("usage"), unit),
                          fmt_units(v.get("forecast"), unit), fmt_units(v.get("allocation"), unit),
                          fmt_units(missing, unit) if missing else "", model] + rq, style))
    widths = column_widths(columns, [cells for cells, _ in rows])
    table = Text(no_wrap=True)
    table.append(header(columns, widths), style="bold reverse")
    for cells, style in rows:
        table.append("\n")
        table.append(format_row(columns, cells, widths), style=style)
    events = [f"{s['resource']}: {s['to']} took {fmt_units(s['units'], units.get(s['resource'], 'units'))} "
              f"from {s['from']} ({s['reason']})" for s in status.get("swaps", ())]
    parts = [head, pool, table]
    if runq and runq.get("protected_cores"):
        parts.append(Text(f"cpu: {runq['protected_cores']} core(s) kept free of lower tiers for "
                          "the critical tier", style="magenta"))
    if events:
        parts.append(Text("swaps this tick: " + ";  ".join(events), style="cyan"))
    return Group(*parts)


def run_top(interval: float, count: int | None = None, live: bool = True,
            console: Console | None = None) -> int:
    """Refresh every ``interval`` seconds, ``count`` times (forever when None)."""
    console = console or Console()
    status = read_status()
    shown = 0
    if live and console.is_terminal:
        from rich.live import Live

        with Live(render(status, runq=status.get("runq")), console=console, auto_refresh=False, screen=False) as view:
            shown = 1
            while count is None or shown < count:
                time.sleep(interval)
                latest = _latest(status)
                view.update(render(latest, runq=latest.get("runq")), refresh=True)
                shown += 1
        return 0
    while True:
        console.print(render(status, runq=status.get("runq")))
        shown += 1
        if count is not None and shown >= count:
            return 0
        time.sleep(interval)
        status = _latest(status)
        console.print()


def _latest(previous: dict[str, Any]) -> dict[str, Any]:
    try:
        return read_status()
    except RswapError:
        return {**previous, "tasks": {}, "swaps": [], "shortfalls": [],
                "pool": previous.get("pool", {}), "pid": f"{previous.get('pid')} (stopped)"}
