"""What the daemon's status says of each forecast: the serving model, its MAE and the season it
follows (``TaskProfile.describe``), at the daemon's own tick length.

On a fake host: a temporary cgroup2 tree (a directory per cgroup with ``cgroup.procs``) and a
driver that replays recorded CPU use (host/driver.py's Reads + Enforces).  The end-to-end test
replays a recorded long-season trace (tests/data/long/cron_30s.csv: a 30 s cron job at a 0.5 s
tick) through the daemon and reads the period back from the status file, ``rswap status
--json``, ``rswap top``'s frame and ``/metrics``.
"""
from __future__ import annotations

import io
import json
import pathlib
import re

import pytest
from rich.console import Console

from rswap_ebpf.errors import ConfigError
from rswap_ebpf.host.cgroup import CgroupMounts
from rswap_ebpf.host.driver import Driver, Enforces, Reads
from rswap_ebpf.model.resources import ResourceType
from rswap_ebpf.offline.trace import read_trace
from rswap_ebpf.predict.profile import NO_PROFILE
from rswap_ebpf.runtime import config
from rswap_ebpf.runtime.daemon import Daemon

CPU = ResourceType.PROCESSOR_CYCLES
LONG = pathlib.Path(__file__).resolve().parents[2] / "data" / "long"
DESCRIBED = set(NO_PROFILE)  # every field describe() gives


class TraceCpu(Driver, Reads, Enforces):
    """Each tick, the next recorded sample of every task (millicores)."""

    resource = CPU

    def __init__(self, series: dict[str, list[float]]):
        self.series = series
        self.at = 0

    def total(self):
        return 2000

    def measure(self, tasks):
        out = {n: float(self.series[n][self.at % len(self.series[n])]) for n in tasks}
        self.at += 1
        return out

    def plan(self, cg, units):
        return []

    def apply(self, cg, units):
        return []


def _daemon(tmp_path, text, series):
    cgroot = tmp_path / "cgroup"
    for name in series:
        (cgroot / name).mkdir(parents=True)
        (cgroot / name / "cgroup.procs").write_text("")
    return Daemon(config.parse(text), drivers=[TraceCpu(series)],
                  mounts=CgroupMounts("unified", str(cgroot)), out=io.StringIO())


TWO = """
[daemon]
interval = 0.5
window = 2
[resources.cpu]
total = 2000
[[task]]
name = "cron"
cgroup = "cron"
forecaster = { name = "seasonal_naive", period = 4 }
[[task]]
name = "web"
cgroup = "web"
"""


def test_every_row_of_the_status_carries_the_forecasts_season(tmp_path, rswap_env):
    series = {"cron": [400.0, 20.0, 20.0, 20.0], "web": [100.0, 110.0, 90.0]}
    d = _daemon(tmp_path, TWO, series)
    d.start()
    try:
        before = d.status()["tasks"]  # published at start, before any sample
        for name in series:
            assert before[name]["resources"]["cpu"].items() >= NO_PROFILE.items()
        for _ in range(40):
            d.tick()
        st = d.status()
    finally:
        d.stop()
    for name in series:
        row = st["tasks"][name]["resources"]["cpu"]
        assert DESCRIBED <= set(row), f"{name}: {sorted(DESCRIBED - set(row))} missing"
    cron = st["tasks"]["cron"]["resources"]["cpu"]
    # a period the configuration gives, in ticks of this daemon's 0.5 s
    assert (cron["model"], cron["period"], cron["period_s"], cron["period_source"],
            cron["period_confidence"]) == ("seasonal_naive", 4, 2.0, "given", 1.0)
    web = d.profiler.profiles[("web", CPU)]
    assert web.forecaster.name == "auto"
    assert web.tick_s == web.forecaster.tick_s == 0.5  # the daemon's interval...
    assert web.forecaster.rollups.widths[0] == 20  # ...so its 10-s buckets are 20 ticks


def test_a_forecaster_naming_another_tick_than_the_daemons_is_refused_at_start():
    text = TWO.replace('cgroup = "web"', 'cgroup = "web"\nforecaster = { name = "auto", '
                       'tick_s = 1.0 }')
    with pytest.raises(ConfigError) as err:
        config.parse(text)
    assert err.value.field == "task web.forecaster.tick_s"


CRON = """
[daemon]
interval = 0.5
window = 1
[resources.cpu]
total = 2000
[[task]]
name = "cron_30s"
cgroup = "cron_30s"
[[task]]
name = "etl_steady"
cgroup = "etl_steady"
"""


def test_a_recorded_30s_cron_shows_its_period_in_status_top_and_metrics(tmp_path, rswap_env):
    """End to end, no kernel: the recorded trace through the daemon's pipeline (forecaster
    ``auto``, the default), then every reader of the status."""
    from prometheus_client.parser import text_string_to_metric_families
    import urllib.request

    from rswap_ebpf.cli.top import read_status, render
    from rswap_ebpf.server.metrics import MetricsExporter
    from tests.conftest import run_rswap

    tr = read_trace(str(LONG / "cron_30s.csv"))
    assert tr.interval == 0.5
    series = {t: list(tr.demand[(t, CPU)][:700]) for t in tr.tasks}
    d = _daemon(tmp_path, CRON, series)
    d.start()
    exporter = MetricsExporter(program_stats=lambda: [])
    try:
        for _ in range(700):
            d.tick()
        st = read_status()  # the file the daemon wrote, as top and an unprivileged status read
        cli = run_rswap("status", "--json", env=rswap_env)
        port = exporter.serve(0)
        exporter.update(st, 0.001)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            metrics = resp.read().decode()
    finally:
        exporter.close()
        d.stop()
    cron = st["tasks"]["cron_30s"]["resources"]["cpu"]
    # recorded every 30 s = 60 ticks; a late tick makes a period in ticks come out short
    assert 56 <= cron["period"] <= 61, cron
    assert cron["period_s"] == pytest.approx(cron["period"] * 0.5)
    assert cron["period_source"] == "ticks" and 0.5 < cron["period_confidence"] <= 1.0
    assert cron["model"] not in (None, "last_value")
    assert cron["period_found"] >= cron["period"]

    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["tasks"]["cron_30s"]["resources"]["cpu"]["period"] \
        == cron["period"]

    con = Console(file=io.StringIO(), width=160, force_terminal=True, color_system="standard")
    con.print(render(st, now=st["time"]))
    frame = re.sub(r"\x1b\[[0-9;]*m", "", con.file.getvalue())
    row = next(line for line in frame.splitlines() if line.startswith("cron_30s"))
    assert f"{cron['model']} p={cron['period']}=" in row
    assert f"/{cron['period_confidence']:.2f}" in row

    seen = {}
    for fam in text_string_to_metric_families(metrics):
        for s in fam.samples:
            if s.name == "rswap_forecast_period_ticks" and s.labels["task"] == "cron_30s":
                seen = dict(s.labels, value=s.value)
    assert seen == {"task": "cron_30s", "resource": "cpu", "model": cron["model"],
                    "source": "ticks", "value": cron["period"]}
