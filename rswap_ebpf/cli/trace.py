"""``rswap record`` and ``rswap replay``: capture what the collectors see, and score policies on it."""
from __future__ import annotations

import argparse
import sys
import time

from rswap_ebpf.errors import ConfigError

EPILOG_RECORD = """examples:
  sudo rswap record --output web.csv --count 120             # the demo's tasks, 2 minutes
  sudo rswap record --config my.toml --output prod.csv --interval 0.5
Nothing is capped while recording (the daemon runs as --dry-run), so the trace holds what each
task wanted. Format: CSV with the header time,task,resource,units (see rswap_ebpf/trace.py).
"""

EPILOG_REPLAY = """examples:
  rswap replay tests/data/periodic_burst.csv
  rswap replay trace.csv --policy proactive --forecaster holt_winters:seasonality=12
  rswap replay trace.csv --forecaster auto:loss=mae --total cpu=2000 --priority web=critical
Forecasters: last_value, seasonal_naive, seasonal_ewma, seasonal_fractional, seasonal_level,
holt_winters, snarimax, quantile_lags, auto (online selection); parameters as
name:key=value,key=value.
A throttled CPU tick shows the policies what --reading says (default: the tick's demand, about
what the CPU driver reads from cpu.stat's throttled time).
With both reactive and proactive run, a last table compares them at equal slack: reactive is
replayed again at every headroom from 0 to 10, and proactive's shortfall is divided by
reactive's at proactive's slack (per task, and per resource over its tasks; resources are never
added to each other, their units differ; --headroom does not change it).
--json writes the same per resource and per task as JSON instead of the tables:
  {"resources": {"cpu": {"ratio_at_equal_slack": R, "mae": {"chosen": M,
   "seasonal_naive": S, ...}, ...}, ...}, "tasks": {TASK: {"cpu": {...}}}}
  rswap replay trace.csv --policy proactive --forecaster seasonal_naive:period=60 --json
"""


def register(sub) -> dict:
    rec = sub.add_parser("record", help="write what the collectors see to a CSV trace",
                         epilog=EPILOG_RECORD, formatter_class=argparse.RawDescriptionHelpFormatter)
    rec.add_argument("--output", "-o", required=True, metavar="TRACE", help="CSV file to write")
    rec.add_argument("--config", metavar="FILE", help="TOML configuration (default: the demo)")
    rec.add_argument("--interval", type=float, metavar="SECONDS", help="seconds per sample")
    rec.add_argument("--count", type=int, metavar="N", help="stop after N ticks")

    rep = sub.add_parser("replay", help="score allocation policies on a recorded trace (no root)",
                         epilog=EPILOG_REPLAY, formatter_class=argparse.RawDescriptionHelpFormatter)
    rep.add_argument("trace", metavar="TRACE")
    rep.add_argument("--policy", action="append", choices=["static", "reactive", "vpa",
                                                           "proactive"],
                     help="policy to run (repeatable; default: all, baselines included)")
    rep.add_argument("--forecaster", default="auto", metavar="SPEC",
                     help="the proactive policy's forecaster (default: auto)")
    rep.add_argument("--total", action="append", default=[], metavar="RES=UNITS",
                     help="pool size (default: the trace's highest summed demand)")
    rep.add_argument("--priority", action="append", default=[], metavar="TASK=TIER",
                     help="critical, normal (default) or batch")
    rep.add_argument("--window", type=int, default=1, metavar="TICKS",
                     help="proactive look-ahead: allocate for the peak of the next N ticks")
    rep.add_argument("--headroom", type=float, default=0.2,
                     help="reactive policy's headroom (default 0.2)")
    rep.add_argument("--proactive-headroom", type=float, default=0.0,
                     help="added to the proactive forecast (default 0: the quantile loss "
                          "already puts the forecast above the median)")
    rep.add_argument("--reading", choices=["demand", "backlog", "growth"], default="demand",
                     help="what a throttled CPU tick shows the policies: the recorded demand "
                          "(default; what use + throttled time reads, roughly), 'backlog' (the "
                          "higher reading of threads with work held back), or 'growth' (no "
                          "reading: twice the allocation, as before round 7)")
    rep.add_argument("--json", action="store_true",
                     help="write the scores per resource and per task as JSON (see below)")
    rep.add_argument("--period", action="append", default=[], metavar="TASK=TICKS",
                     help="with --json: the period seasonal-naive's MAE is given for TASK "
                          "(default: the one found on the whole trace)")
    return {"record": cmd_record, "replay": cmd_replay}


def parse_spec(text: str) -> str | dict:
    """``name`` or ``name:key=value,key=value`` (numbers and true/false parsed) into
    make_forecaster's input."""
    if ":" not in text:
        return text
    name, _, rest = text.partition(":")
    spec: dict = {"name": name}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError("--forecaster", f"expected key=value, got {item!r}")
        if value.lower() in ("true", "false"):
            spec[key] = value.lower() == "true"
            continue
        for conv in (int, float):
            try:
                spec[key] = conv(value)
                break
            except ValueError:
                continue
        else:
            spec[key] = value
    return spec


def _pairs(items: list[str], option: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key or not value:
            raise ConfigError(option, f"expected NAME=VALUE, got {item!r}")
        out.append((key, value))
    return out


def cmd_replay(args) -> int:
    from rswap_ebpf.predict.registry import make_forecaster
    from rswap_ebpf.offline.replay import POLICIES, format_equal_slack, format_table, reactive_frontier, replay
    from rswap_ebpf.model.resources import check_units, parse_resource
    from rswap_ebpf.model.limits import Priority
    from rswap_ebpf.offline.trace import read_trace

    spec = parse_spec(args.forecaster)
    make_forecaster(spec, field="--forecaster")  # bad input: exit 2 before any work
    totals = {parse_resource(k, "--total"): check_units(v, "--total")
              for k, v in _pairs(args.total, "--total")}
    priorities = {k: Priority.parse(v, "--priority") for k, v in _pairs(args.priority,
                                                                         "--priority")}
    if args.window < 1:
        raise ConfigError("--window", "must be at least 1")
    trace = read_trace(args.trace)
    t0 = time.perf_counter()
    result = replay(trace, args.policy or POLICIES, spec, totals, args.headroom,
                    args.proactive_headroom, args.window, priorities=priorities,
                    reading=args.reading)
    if args.json:
        import json

        from rswap_ebpf.offline.scoring import score

        frontier = reactive_frontier(trace, totals=totals, priorities=priorities,
                                     reading=args.reading) \
            if "proactive" in (args.policy or POLICIES) else None
        periods = {}
        for task, ticks in _pairs(args.period, "--period"):
            if not ticks.isdigit() or int(ticks) < 1:
                raise ConfigError("--period", f"{task}: expected a whole number of ticks")
            periods[task] = int(ticks)
        print(json.dumps(score(result, frontier, spec, periods=periods), indent=1,
                         sort_keys=True))
        print(f"(replayed in {time.perf_counter() - t0:.1f}s)", file=sys.stderr)
        return 0
    pool = ", ".join(f"{r.key} {n} {r.unit}" for r, n in result.totals.items())
    print(f"{args.trace}: {len(trace.times)} ticks of {trace.interval:g}s, "
          f"{len(trace.tasks)} task(s), pool {pool}")
    print(format_table(result))
    if {"reactive", "proactive"} <= set(args.policy or POLICIES):
        frontier = reactive_frontier(trace, totals=totals, priorities=priorities,
                                     reading=args.reading)
        print()
        print(format_equal_slack(result, frontier))
    print(f"(replayed in {time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    return 0


def cmd_record(args) -> int:
    import os
    from dataclasses import replace

    from rswap_ebpf.runtime import config as configmod
    from rswap_ebpf.errors import RswapError

    cfg = configmod.load(args.config)
    if args.interval is not None:
        if not 0.05 <= args.interval <= 3600:
            raise ConfigError("--interval", "must be between 0.05 and 3600 seconds")
        cfg = replace(cfg, daemon=replace(cfg.daemon, interval=args.interval))
    if args.count is not None and args.count < 1:
        raise ConfigError("--count", "must be at least 1")
    if not cfg.tasks:
        raise ConfigError("task", f"{cfg.source} defines no [[task]]; nothing to record")
    if os.geteuid() != 0:
        raise RswapError("rswap record needs root (it loads BPF and creates cgroups); try sudo")
    from rswap_ebpf.runtime.daemon import Daemon
    from rswap_ebpf.offline.trace import TraceWriter

    try:
        out = open(args.output, "w", newline="", encoding="utf-8")
    except OSError as err:
        raise ConfigError("--output", f"cannot write {args.output}: {err.strerror}") from None
    with out:
        writer = TraceWriter(out)
        daemon = Daemon(cfg, dry_run=True, out=sys.stderr)
        start = time.monotonic()

        def on_tick(report) -> None:
            rows = [(task, r, units) for task, per in sorted(report.usage.items())
                    for r, units in sorted(per.items(), key=lambda kv: kv[0].key)]
            writer.write_tick(time.monotonic() - start, rows)

        daemon.on_tick = on_tick
        code = daemon.run(args.count)
    print(f"rswap: trace written to {args.output}", file=sys.stderr)
    return code
