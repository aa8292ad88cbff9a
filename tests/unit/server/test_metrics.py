"""The Prometheus exporter, scraped over HTTP on loopback, during a replayed run.

The daemon runs its real control plane (profiler, swap manager, pool) on a replayed CPU trace
through a fake driver (the :class:`ResourceDriver` interface), so no root or BPF is needed.
"""
from __future__ import annotations

import io
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rswap_ebpf.runtime import config
from rswap_ebpf.host.bpfinfo import ProgramStats
from rswap_ebpf.runtime.daemon import Daemon
from rswap_ebpf.host.driver import ResourceDriver
from rswap_ebpf.host.cgroup import CgroupMounts
from rswap_ebpf.server.metrics import MetricsExporter, metric_name
from rswap_ebpf.model.resources import ResourceType

CPU = ResourceType.PROCESSOR_CYCLES

CONFIG = """
[daemon]
interval = 1.0
window = 2
headroom = 0.1
[resources.cpu]
total = 2000
[[task]]
name = "web"
priority = "critical"
cgroup = "web"
forecaster = "last_value"
cpu = { min = 100 }
[[task]]
name = "batch"
priority = "batch"
cgroup = "batch"
forecaster = "last_value"
cpu = { min = 200 }
"""

# millicores per tick: web idles, bursts to 1.5 CPUs, idles; batch always wants everything.
TRACE = [{"web": w, "batch": b} for w, b in
         [(150, 1800)] * 4 + [(1500, 450)] * 4 + [(150, 1800)] * 4]


class ReplayDriver(ResourceDriver):
    """Replays a recorded usage trace; records what the daemon enforced."""

    resource = CPU

    def __init__(self, trace):
        self.trace = list(trace)
        self.applied: list[tuple[str, int]] = []

    def total(self) -> int:
        return 2000

    def measure(self, tasks):
        row = self.trace.pop(0)
        return {name: float(row[name]) for name in tasks}

    def apply(self, cg, units):
        self.applied.append((cg.name, units))
        return []


@pytest.fixture
def daemon(tmp_path, rswap_env):
    cgroot = tmp_path / "cgroup"
    for name in ("web", "batch"):
        (cgroot / name).mkdir(parents=True)
        (cgroot / name / "cgroup.procs").write_text("")
    mounts = CgroupMounts("unified", str(cgroot))
    d = Daemon(config.parse(CONFIG), drivers=[ReplayDriver(TRACE)], mounts=mounts, out=io.StringIO())
    d.start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture
def exporter():
    progs = [ProgramStats(42, "sched_switch", 2_500_000, 1000)]
    e = MetricsExporter(program_stats=lambda: progs)
    yield e
    e.close()


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_scrape_returns_the_replayed_runs_values(daemon, exporter):
    port = exporter.serve(0, "127.0.0.1")
    daemon.on_tick = lambda report: exporter.on_tick(daemon, report)
    swaps: dict[tuple[str, str], int] = {}
    for _ in range(len(TRACE)):
        report = daemon.tick()
        for s in report.result.swaps:
            swaps[(s.target, "received")] = swaps.get((s.target, "received"), 0) + 1
            swaps[(s.source, "given")] = swaps.get((s.source, "given"), 0) + 1
        if report.tick == 6:  # mid-burst: check the gauges against the daemon's own state
            m = scrape(port)
            st = daemon.status()
            for task, prio in (("web", "critical"), ("batch", "batch")):
                labels = (("priority", prio), ("task", task))
                v = st["tasks"][task]["resources"]["cpu"]
                assert m[("rswap_task_cpu_usage_cores", labels)] == pytest.approx(v["usage"] / 1000)
                assert m[("rswap_task_cpu_forecast_cores", labels)] == pytest.approx(v["forecast"] / 1000)
                assert m[("rswap_task_cpu_allocation_cores", labels)] == pytest.approx(
                    daemon.pool.allocation(CPU, task) / 1000)
                assert m[("rswap_task_cpu_forecast_error_cores", labels)] == pytest.approx(v["mae"] / 1000)
            assert m[("rswap_task_cpu_usage_cores", (("priority", "critical"), ("task", "web")))] == 1.5
            assert m[("rswap_pool_cpu_total_cores", ())] == 2.0
            assert m[("rswap_pool_cpu_available_cores", ())] == pytest.approx(
                daemon.pool.available(CPU) / 1000)
    assert swaps, "the replay should make the manager swap units from batch to web"
    m = scrape(port)
    for (task, direction), n in swaps.items():
        assert m[("rswap_swaps_total", (("direction", direction), ("resource", "cpu"), ("task", task)))] == n
    assert m[("rswap_tick_duration_seconds_count", ())] == len(TRACE)
    assert 0 < m[("rswap_tick_duration_seconds_sum", ())] < 60
    assert m[("rswap_tick", ())] == len(TRACE)
    prog = (("id", "42"), ("program", "sched_switch"))
    assert m[("rswap_bpf_program_run_time_seconds_total", prog)] == pytest.approx(0.0025)
    assert m[("rswap_bpf_program_runs_total", prog)] == 1000


def test_shortfall_is_exported_in_base_units(exporter):
    port = exporter.serve(0)
    status = {"tick": 1, "pool": {"cpu": {"unit": "millicores", "total": 1000, "available": 0},
                                  "net": {"unit": "bytes_per_s", "total": 10**6, "available": 0}},
              "tasks": {"web": {"priority": "critical", "exited": None, "resources": {
                  "cpu": {"usage": 900.0, "forecast": 1200.0, "allocation": 1000, "mae": 50.0},
                  "net": {"usage": 5e5, "forecast": 6e5, "allocation": 10**6, "mae": None}}}},
              "swaps": [], "shortfalls": [{"task": "web", "resource": "cpu", "wanted": 1320, "granted": 1000}]}
    exporter.update(status, 0.004)
    m = scrape(port)
    web = (("priority", "critical"), ("task", "web"))
    assert m[("rswap_task_cpu_shortfall_cores", web)] == pytest.approx(0.32)
    assert m[("rswap_task_network_usage_bytes_per_second", web)] == 5e5
    assert ("rswap_task_network_forecast_error_bytes_per_second", web) not in m  # no error yet
    assert m[("rswap_shortfall_ticks_total", (("resource", "cpu"), ("task", "web")))] == 1


def test_the_season_each_forecast_follows_is_exported(exporter):
    """TaskProfile.describe's fields in the status: the period (ticks), its confidence, the
    serving model and where the period was found; a forecast with no season reads 0."""
    port = exporter.serve(0)
    status = {"tick": 1, "pool": {"cpu": {"unit": "millicores", "total": 1000, "available": 0}},
              "tasks": {"cron": {"priority": "batch", "exited": None, "resources": {"cpu": {
                  "usage": 9.0, "forecast": 10.0, "allocation": 20, "mae": 1.0,
                  "model": "seasonal_long", "period": 3600, "period_confidence": 0.8,
                  "period_source": "buckets", "period_found": 3600}}},
                  "idle": {"priority": "batch", "exited": None, "resources": {"cpu": {
                      "usage": 1.0, "forecast": 1.0, "allocation": 5, "mae": 0.0,
                      "model": "last_value", "period": 0, "period_confidence": 0.0,
                      "period_source": "none", "period_found": 120}}}},
              "swaps": [], "shortfalls": []}
    exporter.update(status, 0.004)
    m = scrape(port)
    key = (("model", "seasonal_long"), ("resource", "cpu"), ("source", "buckets"),
           ("task", "cron"))
    assert m[("rswap_forecast_period_ticks", key)] == 3600
    assert m[("rswap_forecast_period_confidence", (("resource", "cpu"), ("task", "cron")))] == 0.8
    assert m[("rswap_forecast_period_ticks", (("model", "last_value"), ("resource", "cpu"),
                                              ("source", "none"), ("task", "idle")))] == 0
    # a season the searches hold though the serving model follows none
    assert m[("rswap_forecast_period_found_ticks", (("resource", "cpu"), ("task", "idle")))] == 120


def test_metric_names_follow_prometheus_conventions():
    assert metric_name("cpu", "usage") == "rswap_task_cpu_usage_cores"
    assert metric_name("net", "allocation") == "rswap_task_network_allocation_bytes_per_second"
    assert metric_name("membw", "usage") == "rswap_task_memory_bandwidth_usage_ratio"
    assert metric_name("gpu_memory", "forecast") == "rswap_task_gpu_memory_forecast_bytes"


def test_port_in_use_is_a_config_error(exporter):
    from rswap_ebpf.errors import ConfigError

    port = exporter.serve(0)
    other = MetricsExporter(program_stats=lambda: [])
    with pytest.raises(ConfigError, match="--metrics-port"):
        other.serve(port)


def test_build_info_and_process_metrics_are_exported(exporter):
    from rswap_ebpf import version

    m = scrape(exporter.serve(0, "127.0.0.1"))
    assert m[("rswap_build_info", (("version", version()),))] == 1.0
    assert version() != "0+unknown"  # the test venv has rswap installed (editable)
    assert m[("process_cpu_seconds_total", ())] > 0
    assert m[("process_resident_memory_bytes", ())] > 0
    assert m[("process_open_fds", ())] >= 3
    assert any(name == "python_info" for name, _ in m)


def test_runqueue_delay_and_protected_cores_are_exported(exporter):
    """The CPU driver's run-queue report (CpuDriver.runq_report) reaches the scrape in seconds."""
    class Driver:
        def runq_report(self):
            return {"tasks": {"web": {"p50_us": 16.0, "p99_us": 2048.0, "mean_us": 40.0, "n": 900}},
                    "protected_cores": 1, "period_ticks": 8}

    class FakeDaemon:  # the status carries the CPU driver's report (runtime.status)
        def status(self):
            return {"tick": 1, "pool": {}, "tasks": {}, "swaps": [], "shortfalls": [],
                    "runq": Driver().runq_report()}

    class Report:
        duration_s = 0.01

    port = exporter.serve(0)
    exporter.on_tick(FakeDaemon(), Report())
    m = scrape(port)
    assert m[("rswap_cpu_runqueue_delay_seconds", (("quantile", "0.99"), ("task", "web")))] == \
        pytest.approx(0.002048)
    assert m[("rswap_cpu_runqueue_wakeups", (("task", "web"),))] == 900
    assert m[("rswap_cpu_protected_cores", ())] == 1
