"""``rswap record`` and ``rswap replay``: capture what the collectors see, and score policies on it."""
from __future__ import annotations

import argparse
import sys
import time

from rswap_ebpf.cli import args as args_
from rswap_ebpf.cli.format import Column, render_table
from rswap_ebpf.errors import ConfigError

EPILOG_RECORD = """examples (as root):
  rswap record --output web.csv --count 120             # the demo's tasks, 2 minutes
  rswap record --config my.toml --output prod.csv --interval 0.5
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
    rec.add_argument("--interval", type=args_.interval, metavar="SECONDS", help="seconds per sample")
    rec.add_argument("--count", type=args_.count, metavar="N", help="stop after N ticks")

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
    rep.add_argument("--window", type=args_.count, default=1, metavar="TICKS",
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
                          "reading: the manager's rule of twice the allocation)")
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
    from rswap_ebpf.offline.replay import POLICIES, reactive_frontier, replay
    from rswap_ebpf.model.resources import check_units, parse_resource
    from rswap_ebpf.model.limits import Priority
    from rswap_ebpf.offline.trace import read_trace

    spec = parse_spec(args.forecaster)
    make_forecaster(spec, field="--forecaster")  # bad input: exit 2 before any work
    totals = {parse_resource(k, "--total"): check_units(v, "--total")
              for k, v in _pairs(args.total, "--total")}
    priorities = {k: Priority.parse(v, "--priority") for k, v in _pairs(args.priority,
                                                                         "--priority")}
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
        cfg = replace(cfg, daemon=replace(cfg.daemon, interval=args.interval))
    if not cfg.tasks:
        raise ConfigError("task", f"{cfg.source} defines no [[task]]; nothing to record")
    if os.geteuid() != 0:
        raise RswapError("rswap record needs root (it loads BPF and creates cgroups); run it as root")
    from rswap_ebpf.cli.run_table import RunTable
    from rswap_ebpf.runtime.daemon import Daemon
    from rswap_ebpf.offline.trace import TraceWriter

    try:
        out = open(args.output, "w", newline="", encoding="utf-8")
    except OSError as err:
        raise ConfigError("--output", f"cannot write {args.output}: {err.strerror}") from None
    with out:
        writer = TraceWriter(out)
        daemon = Daemon(cfg, dry_run=True, out=sys.stderr, hooks=[RunTable(sys.stderr)])
        start = time.monotonic()

        def on_tick(report) -> None:
            rows = [(task, r, units) for task, per in sorted(report.usage.items())
                    for r, units in sorted(per.items(), key=lambda kv: kv[0].key)]
            writer.write_tick(time.monotonic() - start, rows)

        daemon.on_tick = on_tick
        code = daemon.run(args.count)
    print(f"rswap: trace written to {args.output}", file=sys.stderr)
    return code


REPLAY_COLUMNS = (Column("POLICY"), Column("TASK"), Column("RES"), Column("MODEL"),
                  Column("MAE", ">"), Column("MAPE%", ">"), Column("SHORT(u*s)", ">"),
                  Column("SLACK(u*s)", ">"), Column("CHANGES", ">"), Column("SWAPS", ">"))
TOTAL_COLUMNS = (Column("POLICY"), Column("RES"), Column("SHORT(u*s)", ">"), Column("SLACK(u*s)", ">"))
VS_REACTIVE = (Column("SHORT/reactive", ">"), Column("SLACK/reactive", ">"))
EQUAL_SLACK_COLUMNS = (Column("TASK"), Column("RES"), Column("SHORT(u*s)", ">"),
                       Column("SLACK(u*s)", ">"), Column("REACTIVE SHORT", ">"), Column("RATIO", ">"))


def _fig(v: float | None, spec: str = ".0f") -> str:
    return "-" if v is None else format(v, spec)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def format_table(result) -> str:
    """The per task x resource table of a :class:`~rswap_ebpf.offline.replay.ReplayResult`,
    then per resource one line per policy (its tasks summed, in that resource's unit) with
    ratios vs reactive."""
    policies = list(dict.fromkeys(s.policy for s in result.scores))
    rows = [[p, s.task, s.resource.key, s.model or "-", _fig(s.mae), _fig(s.mape),
             _fig(s.shortfall), _fig(s.slack), s.changes, s.swaps]
            for p in policies
            for s in sorted(result.by_policy(p), key=lambda s: (s.task, s.resource.key))]
    ref = "reactive" if "reactive" in policies else None
    totals = []
    for r in result.trace.resources:  # one unit per line: no total across resources
        for p in policies:
            short, slack = result.total(p, "shortfall", r), result.total(p, "slack", r)
            row = [p, r.key, _fig(short), _fig(slack)]
            if ref:
                row += [_ratio(short, result.total(ref, "shortfall", r)),
                        _ratio(slack, result.total(ref, "slack", r))]
            totals.append(row)
    return (render_table(REPLAY_COLUMNS, rows) + "\n\n"
            + render_table(TOTAL_COLUMNS + (VS_REACTIVE if ref else ()), totals))


def format_equal_slack(result, frontier, policy: str = "proactive") -> str:
    """``policy``'s shortfall against reactive's at the same slack, per task x resource and
    summed: the comparison that does not depend on reactive's one headroom."""
    from rswap_ebpf.offline.replay import FRONTIER_HEADROOMS, equal_slack_ratio

    notes = [f"At equal slack: {policy}'s shortfall / reactive's at {policy}'s slack (reactive "
             f"replayed at headroom {min(FRONTIER_HEADROOMS):g}-{max(FRONTIER_HEADROOMS):g}, "
             "read between them).",
             f"'<': {policy} spends less slack than reactive at any headroom; the ratio is to "
             "reactive's shortfall at no headroom."]
    scored = []
    for r in result.trace.resources:  # each resource in its own unit: no total across them
        scored += [((s.task, s.resource), s.task, s.resource.key, s.shortfall, s.slack)
                   for s in sorted(result.by_policy(policy), key=lambda s: s.task)
                   if s.resource == r]
        scored.append((r, "(all tasks)", r.key, result.total(policy, "shortfall", r),
                       result.total(policy, "slack", r)))
    rows = []
    for key, task, res, short, slack in scored:
        at, ratio = equal_slack_ratio(frontier.get(key, []), short, slack)
        rows.append([task, res, _fig(short), _fig(slack), _fig(at), ratio])
    return "\n".join(notes + [render_table(EQUAL_SLACK_COLUMNS, rows)])
