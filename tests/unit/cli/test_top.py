"""``rswap top`` renders frames from the daemon's status file in a test terminal."""
from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from rswap_ebpf.runtime import config
from rswap_ebpf.runtime.daemon import Daemon
from rswap_ebpf.host.cgroup import CgroupMounts
from rswap_ebpf.cli.format import fmt_units
from rswap_ebpf.cli.top import render, run_top
from tests.conftest import run_rswap
from tests.unit.server.test_metrics import CONFIG, TRACE, ReplayDriver


@pytest.fixture
def replayed(tmp_path, rswap_env):
    """A daemon (real control plane, replayed CPU trace) that has published 6 ticks."""
    cgroot = tmp_path / "cgroup"
    for name in ("web", "batch"):
        (cgroot / name).mkdir(parents=True)
        (cgroot / name / "cgroup.procs").write_text("")
    d = Daemon(config.parse(CONFIG), drivers=[ReplayDriver(TRACE)],
               mounts=CgroupMounts("unified", str(cgroot)), out=io.StringIO())
    d.start()
    try:
        for _ in range(6):
            d.tick()
        yield d
    finally:
        d.stop()


def terminal(width: int = 110) -> Console:
    return Console(file=io.StringIO(), width=width, force_terminal=True, color_system="standard",
                   record=True)


def test_frame_shows_tasks_by_resource_with_usage_forecast_allocation(replayed):
    st = replayed.status()
    con = terminal()
    con.print(render(st, now=st["time"] + 2))
    text = con.export_text()
    assert "tick 6" in text and "updated 2.0s ago" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith(("web", "batch"))}
    web = st["tasks"]["web"]["resources"]["cpu"]
    assert rows["web"][:6] == ["web", "critical", "cpu", f"{web['usage']:.0f}m",
                               f"{web['forecast']:.0f}m", f"{web['allocation']}m"]
    assert rows["batch"][1] == "batch"
    assert "pool: cpu 0m free of 2000m" in text
    assert "swaps this tick" in text or not st["swaps"]


def test_rows_are_coloured_when_allocation_did_not_lead_demand():
    status = {"pid": 1, "tick": 3, "time": 100.0, "interval": 1.0,
              "pool": {"cpu": {"unit": "millicores", "total": 2000, "available": 0}},
              "tasks": {"late": {"priority": "critical", "exited": None, "resources": {"cpu": {
                            "usage": 1500.0, "forecast": 1500.0, "allocation": 1000, "model": "last_value", "mae": 10.0}}},
                        "short": {"priority": "normal", "exited": None, "resources": {"cpu": {
                            "usage": 500.0, "forecast": 1200.0, "allocation": 1000, "model": None, "mae": None}}},
                        "fine": {"priority": "batch", "exited": None, "resources": {"cpu": {
                            "usage": 100.0, "forecast": 100.0, "allocation": 200, "model": None, "mae": None}}}},
              "swaps": [], "shortfalls": [{"task": "short", "resource": "cpu", "wanted": 1320, "granted": 1000}]}
    con = terminal()
    con.print(render(status, now=100.0))
    colour = {}
    for raw in con.file.getvalue().splitlines():
        plain = re.sub(r"\x1b\[[0-9;]*m", "", raw).split()
        if plain and plain[0] in status["tasks"]:
            colour[plain[0]] = raw
    assert "\x1b[31m" in colour["late"]    # red: used more than allocated
    assert "\x1b[33m" in colour["short"]   # yellow: forecast above allocation
    assert "\x1b[31m" not in colour["fine"] and "\x1b[33m" not in colour["fine"]
    assert "320m" in colour["short"]       # the shortfall column


def test_the_model_and_the_season_it_follows_are_shown():
    status = {"pid": 1, "tick": 3, "time": 100.0, "interval": 0.5,
              "pool": {"cpu": {"unit": "millicores", "total": 2000, "available": 0}},
              "tasks": {"cron": {"priority": "batch", "exited": None, "resources": {"cpu": {
                  "usage": 80.0, "forecast": 90.0, "allocation": 100, "model": "seasonal_long",
                  "mae": 4.0, "period": 2000, "period_confidence": 0.71,
                  "period_source": "buckets"}}},
                  "flat": {"priority": "batch", "exited": None, "resources": {"cpu": {
                      "usage": 80.0, "forecast": 90.0, "allocation": 100, "model": "last_value",
                      "mae": 4.0, "period": 0, "period_confidence": 0.0,
                      "period_source": "none"}}},
                  "nightly": {"priority": "batch", "exited": None, "resources": {"cpu": {
                      "usage": 80.0, "forecast": 90.0, "allocation": 100, "model": "blend",
                      "mae": 4.0, "period": 0, "period_s": 0, "period_confidence": 0.0,
                      "period_source": "none", "period_found": 7200}}},
                  "hourly": {"priority": "batch", "exited": None, "resources": {"cpu": {
                      "usage": 80.0, "forecast": 90.0, "allocation": 100,
                      "model": "seasonal_naive", "mae": 4.0, "period": 7200, "period_s": 3600.0,
                      "period_confidence": 1.0, "period_source": "given"}}}},
              "swaps": [], "shortfalls": []}
    con = terminal(140)
    con.print(render(status, now=100.0))
    out = re.sub(r"\x1b\[[0-9;]*m", "", con.file.getvalue())
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()}
    assert "seasonal_long p=2000/0.71 (4m)" in rows["cron"]
    assert "last_value p=- (4m)" in rows["flat"]
    # a season found that the model chosen does not follow; a period the configuration gives
    assert "blend p=- found=7200 (4m)" in rows["nightly"]
    assert "seasonal_naive p=7200=1h (4m)" in rows["hourly"]


def test_run_top_prints_count_frames(replayed):
    con = terminal()
    assert run_top(0.05, 2, live=False, console=con) == 0
    assert con.export_text().count("rswap pid") == 2


def test_cli_top_interval_count_positionals(replayed, rswap_env):
    res = run_rswap("top", "0.1", "2", "--no-live", env=rswap_env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("rswap pid") == 2
    assert "web" in res.stdout and "critical" in res.stdout


def test_cli_top_without_daemon_says_so(rswap_env):
    res = run_rswap("top", "0.1", "1", env=rswap_env)
    assert res.returncode == 1
    assert "no rswap daemon is running" in res.stderr


@pytest.mark.parametrize("value,unit,text", [
    (1500, "millicores", "1500m"), (40, "percent", "40%"), (1536, "bytes", "1.5KiB"),
    (12_000_000, "bytes_per_s", "12.0MB/s"), (20000, "iops", "20.0k/s"), (4, "ways", "4w")])
def test_units_read_the_way_operators_expect(value, unit, text):
    assert fmt_units(value, unit) == text


def test_status_prints_the_same_figures_as_top(replayed, rswap_env):
    """``rswap status`` and ``rswap top`` share one fmt_units: the same number reads the same."""
    res = run_rswap("status", env=rswap_env)
    assert res.returncode == 0, res.stderr
    rows = {line.split()[0]: line.split() for line in res.stdout.splitlines()
            if line.startswith(("web", "batch"))}
    st = replayed.status()
    web = st["tasks"]["web"]["resources"]["cpu"]
    assert rows["web"][:6] == ["web", "critical", "cpu", fmt_units(web["usage"], "millicores"),
                               fmt_units(web["forecast"], "millicores"),
                               fmt_units(web["allocation"], "millicores")]
    assert "pool cpu: total 2000m, available 0m" in res.stdout


def test_runqueue_delay_column_and_protection_line_when_the_cpu_driver_reports_them():
    status = {"pid": 1, "tick": 3, "time": 100.0, "interval": 1.0,
              "pool": {"cpu": {"unit": "millicores", "total": 2000, "available": 0}},
              "tasks": {"web": {"priority": "critical", "exited": None, "resources": {"cpu": {
                  "usage": 900.0, "forecast": 900.0, "allocation": 1000, "model": None, "mae": None}}}},
              "swaps": [], "shortfalls": []}
    runq = {"tasks": {"web": {"p50_us": 8.0, "p99_us": 1024.0, "mean_us": 20.0, "n": 50}},
            "protected_cores": 1}
    con = terminal()
    con.print(render(status, now=100.0, runq=runq))
    text = re.sub(r"\x1b\[[0-9;]*m", "", con.file.getvalue())
    assert "RUNQ p99" in text and "1.02ms" in text
    assert "1 core(s) kept free of lower tiers" in text
    con = terminal()
    con.print(render(status, now=100.0))
    assert "RUNQ" not in con.file.getvalue()      # no collector: no column
