"""The ``rswap`` command."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time

from rswap_ebpf.runtime import config as configmod
from rswap_ebpf import paths
from rswap_ebpf.cli import args as args_
from rswap_ebpf.cli.format import Column, fmt_model, fmt_units, render_table
from rswap_ebpf.errors import ConfigError, RswapError

STATUS_COLUMNS = (Column("TASK"), Column("PRIO"), Column("RES"), Column("USED", ">"),
                  Column("FORECAST", ">"), Column("ALLOC", ">"),
                  Column("MODEL p=PERIOD/CONF (MAE)"))
DOCTOR_COLUMNS = (Column("STATUS"), Column("FEATURE"), Column("DETAIL"))

EPILOG_RUN = """examples (as root):
  rswap run                      # the embedded demo: a bursty critical task and a batch job
  rswap run --count 30           # 30 ticks, then stop and restore the host
  rswap run --config /etc/rswap/rswap.toml --interval 0.5
  rswap run --dry-run            # sense and plan, write no limit
"""

EPILOG = """examples (as root, but status and top):
  rswap run                      # the demo: a bursty critical task beside a batch job
  rswap doctor                   # what this kernel offers rswap
  rswap status                   # the running daemon's pool and tasks
  rswap restore                  # after a crash: put the host back

Bad input exits with status 2 and changes nothing. Run 'rswap COMMAND --help' for details.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rswap", description="Pool this host's resources and hand them to tasks before "
        "they become bottlenecks (eBPF sensing, River forecasts, cgroup enforcement).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="log what rswap does")
    from rswap_ebpf import version

    p.add_argument("--version", action="version", version=f"rswap {version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the control loop", epilog=EPILOG_RUN,
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Run the control loop. Without --config, runs the embedded "
                         "demo: two workloads it starts itself and stops on exit.")
    run.add_argument("--config", metavar="FILE", help="TOML configuration (default: the demo)")
    run.add_argument("--interval", type=args_.interval, metavar="SECONDS",
                     help="seconds per tick (overrides daemon.interval)")
    run.add_argument("--count", type=args_.count, metavar="N", help="stop after N ticks")
    run.add_argument("--dry-run", action="store_true", help="plan and print, write no limit")
    run.add_argument("--ebpf", action="store_true",
                     help="print the BPF programs this configuration loads and exit")
    from rswap_ebpf.cli.ops import add_run_options

    add_run_options(run)  # --metrics-port, --metrics-address, --history

    st = sub.add_parser("status", help="show the running daemon's pool and tasks")
    st.add_argument("--json", action="store_true", help="machine-readable output")

    doc = sub.add_parser("doctor", help="check the kernel features rswap uses")
    doc.add_argument("--json", action="store_true", help="machine-readable output")
    doc.add_argument("--config", metavar="FILE", help="exit non-zero if a feature it needs is missing")

    rs = sub.add_parser("restore", help="undo what a killed rswap left behind")
    rs.add_argument("--state-dir", metavar="DIR", help=f"journal location (default {paths.STATE_DIR})")

    for module in COMMAND_MODULES:
        for name, handler in importlib.import_module(module).register(sub).items():
            _HANDLERS[name] = handler
    return p


#: Modules adding subcommands: each has ``register(subparsers) -> {name: handler(args) -> int}``.
COMMAND_MODULES: tuple[str, ...] = (
    "rswap_ebpf.cli.ops",
    "rswap_ebpf.cli.trace",
    "rswap_ebpf.cli.tasks",
)
_HANDLERS: dict = {}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    signals = _stop_signals_for_run(argv)
    try:
        return _main(argv, signals)
    finally:
        if signals is not None:
            signals.restore()


def _stop_signals_for_run(argv: list[str]):
    """``rswap run`` takes SIGINT, SIGTERM and SIGHUP before anything else (parsing, imports):
    a signal during start-up is kept and answered by a clean stop, never a kill mid-way."""
    if "run" not in [a for a in argv if not a.startswith("-")][:1]:
        return None
    from rswap_ebpf.runtime.daemon import StopSignals

    return StopSignals().install()


def _main(argv: list[str], signals) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="rswap: %(message)s")
    if not args.command:
        parser.print_help()
        return 2
    try:
        if args.command == "run":
            return cmd_run(args, signals)
        handlers = {"status": cmd_status, "doctor": cmd_doctor, "restore": cmd_restore,
                    **_HANDLERS}
        return handlers[args.command](args)
    except RswapError as err:
        print(f"rswap: error: {err}", file=sys.stderr)
        return err.exit_status
    except KeyboardInterrupt:
        return 130


def cmd_run(args, signals=None) -> int:
    cfg = configmod.load(args.config)
    if args.ebpf:
        from rswap_ebpf.host.bpf import bpf_source_dir
        from rswap_ebpf.host.registry import bpf_programs

        src = bpf_source_dir()
        for name in ["rswap.h", *bpf_programs(cfg.resources)]:
            print(f"/* ===== bpf/{name} ===== */")
            print((src / name).read_text())
        return 0
    if args.interval:
        from dataclasses import replace

        cfg = replace(cfg, daemon=replace(cfg.daemon, interval=args.interval))
    if not cfg.tasks:
        raise ConfigError("task", f"{cfg.source} defines no [[task]]; nothing to do")
    args_.need_root("run")
    from rswap_ebpf.cli.ops import observe
    from rswap_ebpf.cli.run_table import RunTable
    from rswap_ebpf.runtime.daemon import Daemon
    from rswap_ebpf.server.service import ControlService

    # The control socket first: the table's header is printed once it answers.
    daemon = Daemon(cfg, dry_run=args.dry_run, hooks=[ControlService(), RunTable()],
                    signals=signals)
    with observe(daemon, args):
        return daemon.run(args.count)


def cmd_status(args) -> int:
    from rswap_ebpf.server.control import answer_timeout, request

    st = None
    try:  # the daemon's own answer, through the control socket (root)...
        st = request("status", timeout=answer_timeout(5))["status"]
    except RswapError:  # ...else (not root, or no daemon) the status file it writes every tick
        from rswap_ebpf.cli.top import read_status

        st = read_status()
    if args.json:
        json.dump(st, sys.stdout, indent=2)
        print()
        return 0
    age = time.time() - st["time"]
    print(f"rswap pid {st['pid']}, tick {st['tick']} ({age:.1f}s ago)"
          + (", dry run" if st.get("dry_run") else ""))
    for key, r in st["pool"].items():
        print(f"pool {key}: total {fmt_units(r['total'], r['unit'])}, "
              f"available {fmt_units(r['available'], r['unit'])}")
    units = {k: r["unit"] for k, r in st["pool"].items()}
    rows = []
    for name, t in st["tasks"].items():
        for key, v in t["resources"].items():
            unit = units.get(key, "units")
            rows.append([name, t["priority"], key, fmt_units(v["usage"], unit),
                         fmt_units(v["forecast"], unit), fmt_units(v["allocation"], unit),
                         fmt_model(v, unit)])
    print(render_table(STATUS_COLUMNS, rows))
    return 0


def cmd_doctor(args) -> int:
    from rswap_ebpf.cli.doctor import needed_missing, run_checks

    cfg = configmod.load(args.config) if args.config else None
    checks = run_checks(cfg)
    if cfg is not None:
        needed = cfg.resources
    else:
        from rswap_ebpf.model.resources import ResourceType

        needed = {ResourceType.PROCESSOR_CYCLES}
    bad = needed_missing(checks, needed)
    if args.json:
        json.dump([{"feature": c.feature, "status": c.status, "detail": c.detail, "fix": c.fix,
                    "needed_by": [r.key for r in c.needed_by]} for c in checks], sys.stdout, indent=2)
        print()
    else:
        print(render_table(DOCTOR_COLUMNS, [
            [c.status, c.feature, c.detail + (f"  -> {c.fix}" if c.fix and c.status != "ok" else "")]
            for c in checks]))
        if bad:
            print(f"\n{len(bad)} feature(s) this configuration needs are missing.")
    return 1 if bad else 0


def cmd_restore(args) -> int:
    args_.need_root("restore")
    from rswap_ebpf.runtime.lock import Lock, restore_host

    state_dir = args.state_dir or paths.root("STATE_DIR")
    if Lock.held(state_dir):
        raise RswapError("an rswap daemon is running; stop it (it restores on exit) instead")
    restored, failed, pins = restore_host(state_dir)
    for f in failed:
        print(f"rswap: could not restore {f}", file=sys.stderr)
    print(f"rswap: restored {restored} change(s), removed {pins} pinned map(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
