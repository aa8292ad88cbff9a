"""Prometheus exporter: ``rswap run --metrics-port PORT``.

The exporter is fed once per tick with the daemon's status (the same document ``rswap status
--json`` prints) and the tick's duration, and serves the last values on ``/metrics``.  Names follow
Prometheus conventions: one unit per name, in base units (CPU in cores, not millicores; memory
bandwidth as a ratio, not percent; bytes per second), ``_total`` on counters.  For example::

    rswap_task_cpu_usage_cores{task="web",priority="critical"} 1.42
    rswap_task_cpu_forecast_cores / _allocation_cores / _shortfall_cores / _forecast_error_cores
    rswap_swaps_total{resource="cpu",task="web",direction="received"} 3
    rswap_tick_duration_seconds_bucket{le="0.005"} ...
    rswap_bpf_program_run_time_seconds_total{program="sched_switch",id="42"} 0.0031
    rswap_build_info{version="0.1.0"} 1
    process_cpu_seconds_total / process_resident_memory_bytes / ... and python_info

A resource that is one of several of its type (``coproc:fpga0``, ``coproc:npu``) shares its type's
names and carries the instance as a label named after the type::

    rswap_task_coproc_usage_units{task="web",priority="critical",coproc="fpga0"} 3
    rswap_pool_coproc_total_units{coproc="npu"} 4
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import (CollectorRegistry, Histogram, Info, PlatformCollector,
                               ProcessCollector)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unit:
    """How one resource's allocation unit is exported: metric name stem, base unit, factor."""

    stem: str
    base: str
    factor: float


#: resource key -> how its units map to a Prometheus base unit.
UNITS: dict[str, Unit] = {
    "cpu": Unit("cpu", "cores", 1e-3),                       # millicores
    "cache": Unit("cache", "ways", 1.0),
    "membw": Unit("memory_bandwidth", "ratio", 1e-2),         # percent of a domain
    "gpu_memory": Unit("gpu_memory", "bytes", 1.0),
    "net": Unit("network", "bytes_per_second", 1.0),
    "io": Unit("block_io", "requests_per_second", 1.0),       # iops
    "coproc": Unit("coproc", "units", 1.0),
}

KINDS = {
    "usage": "used over the last tick",
    "forecast": "forecast peak over the look-ahead window",
    "allocation": "currently allocated (what is enforced)",
    "shortfall": "wanted but not granted in the last tick",
    "forecast_error": "forecaster mean absolute error (exponentially weighted)",
}

TICK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def split_key(resource: str) -> tuple[str, str]:
    """``coproc:fpga0`` -> ``("coproc", "fpga0")``; ``cpu`` -> ``("cpu", "")``."""
    base, _, instance = resource.partition(":")
    return base, instance


def unit_for(resource: str, unit_name: str = "units") -> Unit:
    base = split_key(resource)[0]
    return UNITS.get(base) or Unit(base, unit_name, 1.0)


def metric_name(resource: str, kind: str, unit_name: str = "units") -> str:
    u = unit_for(resource, unit_name)
    return f"rswap_task_{u.stem}_{kind}_{u.base}"


class MetricsExporter:
    """Holds the latest tick's values and renders them on each scrape.

    ``program_stats`` returns the BPF programs' cumulative run time; by default the programs that
    use maps pinned under ``paths.pin_dir()`` (see :mod:`rswap_ebpf.host.bpfinfo`).
    """

    def __init__(self, registry: CollectorRegistry | None = None,
                 program_stats: Callable[[], list] | None = None):
        self.registry = registry or CollectorRegistry()
        self.program_stats = program_stats
        self._lock = threading.Lock()
        self._status: dict[str, Any] | None = None
        self._swaps: dict[tuple[str, str, str], int] = {}
        self._swapped: dict[tuple[str, str, str], float] = {}
        self._shortfall_ticks: dict[tuple[str, str], int] = {}
        self._stats_fd: int | None = None
        #: the CPU driver's run-queue report (host.cpu.driver.CpuDriver.runq_report), or None
        self._runq: dict[str, Any] | None = None
        self._server = None
        self._thread = None
        self.tick_duration = Histogram("rswap_tick_duration_seconds",
                                       "Time one tick took: sense, forecast, swap and enforce",
                                       buckets=TICK_BUCKETS, registry=self.registry)
        self.registry.register(_Collector(self))
        # the standard process_* (CPU seconds, memory, fds, start time) and python_info
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        from rswap_ebpf import version

        Info("rswap_build", "The rswap build that serves these metrics",
             registry=self.registry).info({"version": version()})

    # -- input -----------------------------------------------------------------------------
    def update(self, status: Mapping[str, Any], tick_duration_s: float) -> None:
        """Record one tick: ``status`` is :meth:`Daemon.status`'s document."""
        with self._lock:
            self._status = dict(status)
            for s in status.get("swaps", ()):
                for task, direction in ((s["to"], "received"), (s["from"], "given")):
                    key = (s["resource"], task, direction)
                    self._swaps[key] = self._swaps.get(key, 0) + 1
                    self._swapped[key] = self._swapped.get(key, 0.0) + s["units"]
            for sf in status.get("shortfalls", ()):
                key = (sf["task"], sf["resource"])
                self._shortfall_ticks[key] = self._shortfall_ticks.get(key, 0) + 1
        self.tick_duration.observe(tick_duration_s)

    def on_tick(self, daemon, report) -> None:
        """The daemon hook: ``daemon.on_tick = lambda r: exporter.on_tick(daemon, r)``."""
        status = daemon.status()
        with self._lock:
            self._runq = status.get("runq")
        self.update(status, report.duration_s)

    # -- serving -----------------------------------------------------------------------------
    def serve(self, port: int, address: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``address:port`` in a thread; returns the bound port."""
        from prometheus_client import start_http_server

        from rswap_ebpf.errors import ConfigError

        try:
            self._server, self._thread = start_http_server(port, address, registry=self.registry)
        except OSError as err:
            raise ConfigError("--metrics-port", f"cannot listen on {address}:{port}: {err.strerror}") from None
        if self.program_stats is None:
            from rswap_ebpf.host import bpfinfo

            self.program_stats = bpfinfo.rswap_program_stats
            try:
                self._stats_fd = bpfinfo.enable_run_time_stats()
            except OSError as err:
                log.warning("BPF run-time statistics unavailable (%s): "
                            "rswap_bpf_program_run_time_seconds_total stays 0", err.strerror)
        return self._server.server_address[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._stats_fd is not None:
            os.close(self._stats_fd)
            self._stats_fd = None

    # -- rendering ---------------------------------------------------------------------------
    def families(self):
        with self._lock:
            st = self._status
            swaps = dict(self._swaps)
            swapped = dict(self._swapped)
            short_ticks = dict(self._shortfall_ticks)
            runq = self._runq
        yield from self._program_families()
        yield from _runq_families(runq)
        if st is None:
            return
        units = {k: r.get("unit", "units") for k, r in st.get("pool", {}).items()}
        up = GaugeMetricFamily("rswap_tick", "Ticks done by the running daemon")
        up.add_metric([], st.get("tick", 0))
        yield up
        yield from self._pool_families(st, units)
        shortfall = {(sf["task"], sf["resource"]): sf["wanted"] - sf["granted"]
                     for sf in st.get("shortfalls", ())}
        fams = _Families()
        # the season each forecast follows (status fields "period", "period_confidence",
        # "period_source", "model" of TaskProfile.describe), so a silent last-value shows
        season = GaugeMetricFamily("rswap_forecast_period_ticks", "Ticks of the season the "
                                   "serving forecaster follows (0: none, it repeats the last "
                                   "value or has no seasonal model)",
                                   labels=["task", "resource", "model", "source"])
        sure = GaugeMetricFamily("rswap_forecast_period_confidence", "Autocorrelation at that "
                                 "period (0-1; 1 for a period given in the configuration)",
                                 labels=["task", "resource"])
        found = GaugeMetricFamily("rswap_forecast_period_found_ticks", "Ticks of the longest "
                                  "season the period searches hold, whether or not the serving "
                                  "forecaster follows it (0: none found)",
                                  labels=["task", "resource"])
        for task, t in st.get("tasks", {}).items():
            if t.get("exited") is not None:
                continue
            for res, v in t.get("resources", {}).items():
                if "period" in v:
                    season.add_metric([task, res, v.get("model") or "",
                                       v.get("period_source") or "none"], v["period"] or 0)
                    sure.add_metric([task, res], v.get("period_confidence") or 0.0)
                    found.add_metric([task, res], v.get("period_found") or v["period"] or 0)
                u = unit_for(res, units.get(res, "units"))
                base, instance = split_key(res)
                values = {"usage": v.get("usage"), "forecast": v.get("forecast"),
                          "allocation": v.get("allocation"), "shortfall": shortfall.get((task, res), 0),
                          "forecast_error": v.get("mae")}
                for kind, value in values.items():
                    if value is None:
                        continue
                    name = metric_name(res, kind, units.get(res, "units"))
                    fams.add(name, f"{base} {KINDS[kind]}, in {u.base}",
                             {"task": task, "priority": t.get("priority", "")}, base, instance,
                             value * u.factor)
        yield from fams.gauges()
        if season.samples:
            yield season
            yield sure
            yield found
        count = CounterMetricFamily("rswap_swaps", "Swaps a task received from, or gave to, "
                                    "another task", labels=["resource", "task", "direction"])
        for (res, task, direction), n in sorted(swaps.items()):
            count.add_metric([res, task, direction], n)
        yield count
        moved: dict[str, CounterMetricFamily] = {}
        for (res, task, direction), n in sorted(swapped.items()):
            u = unit_for(res, units.get(res, "units"))
            name = f"rswap_swapped_{u.stem}_{u.base}"
            fam = moved.get(name) or moved.setdefault(name, CounterMetricFamily(
                name, f"{res} moved by swaps, summed over swaps, in {u.base}",
                labels=["resource", "task", "direction"]))
            fam.add_metric([res, task, direction], n * u.factor)
        yield from moved.values()
        st_ticks = CounterMetricFamily("rswap_shortfall_ticks", "Ticks in which a task was not "
                                       "granted all it was forecast to need", labels=["task", "resource"])
        for (task, res), n in sorted(short_ticks.items()):
            st_ticks.add_metric([task, res], n)
        yield st_ticks

    def _pool_families(self, st, units):
        fams = _Families()
        for res, r in st.get("pool", {}).items():
            u = unit_for(res, units.get(res, "units"))
            base, instance = split_key(res)
            for kind in ("total", "available"):
                fams.add(f"rswap_pool_{u.stem}_{kind}_{u.base}",
                         f"{base} the pool holds ({kind}), in {u.base}", {}, base, instance,
                         r[kind] * u.factor)
        yield from fams.gauges()

    def _program_families(self):
        if self.program_stats is None:
            return
        try:
            stats = self.program_stats()
        except OSError as err:
            log.warning("reading BPF program statistics: %s", err)
            return
        t = CounterMetricFamily("rswap_bpf_program_run_time_seconds", "Time rswap's BPF programs "
                                "ran in the kernel (kernel BPF statistics)", labels=["program", "id"])
        n = CounterMetricFamily("rswap_bpf_program_runs", "Times rswap's BPF programs ran",
                                labels=["program", "id"])
        for p in stats:
            t.add_metric([p.name, str(p.id)], p.run_time_ns / 1e9)
            n.add_metric([p.name, str(p.id)], p.run_cnt)
        yield t
        yield n


def _runq_families(runq: Mapping[str, Any] | None):
    """Each task's run-queue delay over the last tick (bpf/runq.bpf.c) and the cores the CPU
    driver keeps lower tiers off; nothing when the collector is not loaded."""
    if not runq:
        return
    g = GaugeMetricFamily("rswap_cpu_runqueue_delay_seconds", "Run-queue delay (runnable to "
                          "running) over the last tick, by quantile (log2 bucket bound)",
                          labels=["task", "quantile"])
    n = GaugeMetricFamily("rswap_cpu_runqueue_wakeups", "Delays measured over the last tick",
                          labels=["task"])
    for task, v in sorted(runq.get("tasks", {}).items()):
        for q in ("p50", "p99"):
            g.add_metric([task, "0.5" if q == "p50" else "0.99"], v.get(f"{q}_us", 0) / 1e6)
        n.add_metric([task], v.get("n", 0))
    yield g
    yield n
    c = GaugeMetricFamily("rswap_cpu_protected_cores", "Cores the CPU driver keeps normal and "
                          "batch tasks off for the critical tier now")
    c.add_metric([], runq.get("protected_cores", 0))
    yield c


class _Families:
    """Gauge families built row by row.  A named instance's rows carry its type as a label
    (``coproc="fpga0"``); were an unnamed one in the same family, it gets that label empty, so
    every sample of a family has the same label names, as the exposition format requires."""

    def __init__(self) -> None:
        self._rows: dict[str, tuple[str, list[tuple[dict[str, str], str, str, float]]]] = {}

    def add(self, name: str, doc: str, labels: dict[str, str], base: str, instance: str,
            value: float) -> None:
        self._rows.setdefault(name, (doc, []))[1].append((labels, base, instance, value))

    def gauges(self):
        for name, (doc, rows) in self._rows.items():
            named = sorted({base for _, base, instance, _ in rows if instance})
            label_names = list(rows[0][0]) + named
            fam = GaugeMetricFamily(name, doc, labels=label_names)
            for labels, base, instance, value in rows:
                extra = [instance if base == n else "" for n in named]
                fam.add_metric(list(labels.values()) + extra, value)
            yield fam


class _Collector:
    def __init__(self, exporter: MetricsExporter):
        self.exporter = exporter

    def collect(self):
        return self.exporter.families()

    def describe(self):
        return []  # names depend on the resources managed: nothing to check at registration
