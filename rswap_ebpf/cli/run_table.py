"""The live table ``rswap run`` prints: one line per task x resource and tick.

A :class:`~rswap_ebpf.runtime.daemon.Hook`: the header once the daemon has started, the rows
after each tick, from the tick's report (the runtime itself prints no table).
"""
from __future__ import annotations

import sys
from typing import IO

from rswap_ebpf.cli.format import fmt_units
from rswap_ebpf.runtime.daemon import Daemon, Hook
from rswap_ebpf.runtime.pipeline import TickReport

class RunTable(Hook):
    def __init__(self, out: IO[str] | None = None) -> None:
        self.out = out if out is not None else sys.stdout
        self.daemon: Daemon | None = None

    def _say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def _widths(self) -> tuple[int, int]:
        d = self.daemon
        return (max([12] + [len(n) for n in d.tasks]),
                max([4] + [len(r.key) for r in d.pool.types()]))  # coproc:fpga0

    def start(self, daemon: Daemon) -> None:
        self.daemon = d = daemon
        totals = ", ".join(f"{r.key} {d.pool.total(r)} {r.unit}" for r in d.pool.types())
        mode = " (dry run: nothing is written)" if d.dry_run else ""
        self._say(f"rswap: {len(d.tasks)} task(s), pool: {totals}, every "
                  f"{d.config.daemon.interval:g}s{mode}; Ctrl-C stops and restores")
        w, rw = self._widths()
        self._say(f"{'TICK':>5} {'TASK':<{w}} {'PRIO':<8} {'RES':<{rw}} {'USED':>8} "
                  f"{'FORECAST':>9} {'ALLOC':>8} {'FREE':>6}  EVENTS")

    def tick(self, report: TickReport) -> None:
        d = self.daemon
        events: dict[str, list[str]] = {}
        for ch in report.result.changes:
            events.setdefault(ch.task, []).append(
                f"{ch.resource.key} {ch.old}->{ch.new} ({ch.reason})")
        for s in report.result.swaps:
            events.setdefault(s.target, []).append(f"took {s.units} from {s.source}")
        for sf in report.result.shortfalls:
            events.setdefault(sf.task, []).append(f"short {sf.missing}")
        w, rw = self._widths()
        for name, rt in d.tasks.items():
            if rt.exited is not None:
                continue
            for r in d.pool.types():
                used = report.usage.get(name, {}).get(r, 0.0)
                fc = report.forecasts.get(name, {}).get(r, 0.0)
                self._say(f"{report.tick:>5} {name:<{w}} {rt.priority:<8} {r.key:<{rw}} "
                          f"{fmt_units(used, r):>8} {fmt_units(fc, r):>9} "
                          f"{fmt_units(d.pool.allocation(r, name), r):>8} "
                          f"{fmt_units(d.pool.available(r), r):>6}  "
                          + "; ".join(events.get(name, [])))
