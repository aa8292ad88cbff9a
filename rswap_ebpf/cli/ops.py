"""Operator commands: ``rswap top``, ``rswap plot``, ``rswap maps`` and ``rswap default-config``.

Registered through ``cli.COMMAND_MODULES``; each handler imports its heavy dependency (rich,
matplotlib, bcc) only when it runs, so ``rswap --help`` stays fast.
"""
from __future__ import annotations

import argparse
import sys
from importlib import resources as importlib_resources

from rswap_ebpf.cli import args as args_

EPILOG_TOP = """examples:
  rswap top             # refresh every second until Ctrl-C
  rswap top 2 10        # every 2 seconds, 10 times
  rswap top 1 1 --no-live   # one frame, plain text (for scripts and logs)
"""

EPILOG_PLOT = """input: one of
  - a status history: JSON lines, one `rswap status --json` object per line
    (rswap run --history FILE writes it; see the README);
  - a CSV with the header time,task,resource,usage,forecast,allocation[,swap]
    (time in seconds; swap non-empty on rows where the task received or gave units).
examples:
  rswap plot /var/lib/rswap/history.jsonl --output report.png
  rswap plot run.csv --output report.png --resource cpu --task web
"""

EPILOG_MAPS = """examples (as root):
  rswap maps            # while rswap runs: its pinned maps and how to dump them
  rswap maps --json
"""


def register(sub) -> dict:
    top = sub.add_parser("top", help="live view of tasks x resources (usage, forecast, allocation)",
                         epilog=EPILOG_TOP, formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="A live terminal view of the running daemon, read from its "
                         "status file each interval.")
    top.add_argument("interval", nargs="?", type=args_.interval, default=1.0,
                     help="seconds between refreshes (default 1)")
    top.add_argument("count", nargs="?", type=args_.count, help="number of refreshes (default: forever)")
    top.add_argument("--no-live", action="store_true",
                     help="print each frame one after another instead of redrawing the screen")

    plot = sub.add_parser("plot", help="usage vs forecast vs allocation over time, swaps marked",
                          epilog=EPILOG_PLOT, formatter_class=argparse.RawDescriptionHelpFormatter,
                          description="Draw, per task, usage, forecast and allocation over time "
                          "with swaps marked: did allocation lead demand?")
    plot.add_argument("trace", metavar="TRACE_OR_STATE", help="status history (.jsonl) or CSV")
    plot.add_argument("--output", "-o", required=True, metavar="FILE", help="image to write (.png, .svg, .pdf)")
    plot.add_argument("--resource", metavar="KEY", help="only this resource (cpu, io, net, ...)")
    plot.add_argument("--task", action="append", metavar="NAME", help="only these tasks (repeatable)")

    maps = sub.add_parser("maps", help="rswap's pinned BPF maps and the bpftool command for each",
                          epilog=EPILOG_MAPS, formatter_class=argparse.RawDescriptionHelpFormatter)
    maps.add_argument("--json", action="store_true", help="machine-readable output")

    dc = sub.add_parser("default-config", help="print the commented default configuration (or the systemd unit)",
                        description="Print the configuration file shipped with rswap, to start "
                        "/etc/rswap/rswap.toml from; with --unit, the systemd unit rswap.service.")
    dc.add_argument("--unit", action="store_true", help="print rswap.service instead")
    return {"top": cmd_top, "plot": cmd_plot, "maps": cmd_maps, "default-config": cmd_default_config}


def shipped(name: str) -> str:
    """A file shipped in ``rswap_ebpf/data`` (``rswap.toml``, ``rswap.service``)."""
    return importlib_resources.files("rswap_ebpf.data").joinpath(name).read_text()


def cmd_default_config(args) -> int:
    sys.stdout.write(shipped("rswap.service" if args.unit else "rswap.toml"))
    return 0


def cmd_top(args) -> int:
    from rswap_ebpf.cli.top import run_top

    return run_top(args.interval, args.count, live=not args.no_live)


def cmd_plot(args) -> int:
    from rswap_ebpf.offline.plot import load_history, render

    history = load_history(args.trace)
    render(history, args.output, resource=args.resource, tasks=args.task)
    print(f"rswap: wrote {args.output}")
    return 0


def cmd_maps(args) -> int:
    import json

    from rswap_ebpf.host.bpfinfo import list_pinned

    pins = list_pinned()
    if args.json:
        json.dump([p.as_dict() for p in pins], sys.stdout, indent=2)
        print()
        return 0
    if not pins:
        from rswap_ebpf import paths

        print(f"rswap: no maps pinned under {paths.pin_dir()} (is rswap running?)")
        return 1
    from rswap_ebpf.cli.format import Column, render_table

    print(render_table((Column("MAP"), Column("TYPE"), Column("KEY", ">"), Column("VALUE", ">"),
                        Column("MAX", ">"), Column("DUMP WITH")),
                       [[p.name, p.map_type, f"{p.key_size}B", f"{p.value_size}B", p.max_entries,
                         p.dump_command] for p in pins]))
    return 0


def add_run_options(run) -> None:
    """``rswap run`` options for watching the daemon (called by cli.build_parser)."""
    run.add_argument("--metrics-port", type=args_.port, metavar="PORT",
                     help="serve Prometheus metrics on http://ADDRESS:PORT/metrics")
    run.add_argument("--metrics-address", default="127.0.0.1", metavar="ADDRESS",
                     help="address the metrics server binds (default 127.0.0.1; 0.0.0.0 for "
                     "a Prometheus on another host)")
    run.add_argument("--history", metavar="FILE",
                     help="append each tick's status (JSON lines) to FILE, for rswap plot")


class Observers:
    """What ``rswap run`` feeds each tick besides its own output: exporter, history file."""

    def __init__(self, daemon, metrics_port: int | None = None, metrics_address: str = "127.0.0.1",
                 history: str | None = None):
        from rswap_ebpf.errors import ConfigError

        self.daemon = daemon
        self.exporter = None
        self.history = None
        self.port = None
        if history:
            try:
                self.history = open(history, "a", encoding="utf-8")
            except OSError as err:
                raise ConfigError("--history", f"cannot open {history}: {err.strerror}") from None
        if metrics_port is not None:
            from rswap_ebpf.server.metrics import MetricsExporter

            self.exporter = MetricsExporter()
            self.port = self.exporter.serve(metrics_port, metrics_address)
            print(f"rswap: metrics on http://{metrics_address}:{self.port}/metrics", flush=True)
        self._previous = daemon.on_tick
        daemon.on_tick = self.on_tick

    def on_tick(self, report) -> None:
        import json

        if self._previous:
            self._previous(report)
        status = self.daemon.status() if (self.exporter or self.history) else None
        if self.exporter:
            self.exporter.update(status, report.duration_s)
        if self.history:
            self.history.write(json.dumps(status, separators=(",", ":")) + "\n")
            self.history.flush()

    def close(self) -> None:
        self.daemon.on_tick = self._previous
        if self.exporter:
            self.exporter.close()
        if self.history:
            self.history.close()

    def __enter__(self) -> Observers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def observe(daemon, args) -> Observers:
    return Observers(daemon, getattr(args, "metrics_port", None),
                     getattr(args, "metrics_address", "127.0.0.1"), getattr(args, "history", None))
