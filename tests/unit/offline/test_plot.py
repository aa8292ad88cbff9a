"""``rswap plot`` from the shipped trace and from a status history.

``tests/data/plot/replay_history.csv`` was produced by the real control plane (profiler with
Holt-Winters, swap manager, pool) on a replayed bursty CPU trace: web bursts to 1.5 CPUs for 4 s
every 12 s, batch takes whatever it is allocated.
"""
from __future__ import annotations

import json
import os
import struct

import pytest

from rswap_ebpf.errors import ConfigError
from rswap_ebpf.offline.plot import load_history, render
from tests.conftest import run_rswap
from tests.unit.cli.test_top import replayed  # noqa: F401  (fixture)

SHIPPED = os.path.join(os.path.dirname(__file__), "..", "..", "data", "plot", "replay_history.csv")


def png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", head[16:24])


def test_shipped_trace_loads_with_swaps():
    h = load_history(SHIPPED)
    assert set(h.series) == {("web", "cpu"), ("batch", "cpu")}
    web = h.series[("web", "cpu")]
    assert len(web.time) == 60 and web.unit == "millicores"
    received = [s for s in h.swaps if s.task == "web" and s.units > 0]
    given = [s for s in h.swaps if s.task == "batch" and s.units < 0]
    assert received and given
    assert 0.0 <= h.series[("batch", "cpu")].covered() < 1.0  # batch was squeezed at times


def test_cli_plots_the_shipped_trace(tmp_path):
    out = tmp_path / "report.png"
    res = run_rswap("plot", SHIPPED, "--output", str(out))
    assert res.returncode == 0, res.stderr
    w, h = png_size(out)
    assert (w, h) == (1000, 2 * 260 + 60)  # one 2.6-inch panel per task at 100 dpi, plus title


def test_status_history_from_a_run_plots(replayed, tmp_path):
    path = tmp_path / "history.jsonl"
    with open(path, "w") as f:
        for _ in range(4):
            replayed.tick()
            f.write(json.dumps(replayed.status()) + "\n")
    h = load_history(str(path))
    web = h.series[("web", "cpu")]
    assert web.allocation[-1] == replayed.pool.allocation(next(iter(replayed.pool.types())), "web")
    drawn = render(h, str(tmp_path / "r.svg"), tasks=["web"])
    assert drawn == [("web", "cpu")]
    assert (tmp_path / "r.svg").read_text().startswith("<?xml")


def test_recorded_usage_only_trace_is_accepted(tmp_path):
    path = tmp_path / "rec.csv"
    path.write_text("time,task,resource,units\n0,web,cpu,100\n1,web,cpu,300\n")
    h = load_history(str(path))
    assert h.series[("web", "cpu")].usage == [100.0, 300.0]
    assert h.series[("web", "cpu")].covered() is None
    render(h, str(tmp_path / "rec.png"))
    assert png_size(tmp_path / "rec.png")[0] == 1000


@pytest.mark.parametrize("text,field", [
    ("a,b\n1,2\n", "bad.csv"),
    ("time,task,resource,usage,forecast,allocation\nx,web,cpu,1,1,1\n", "bad.csv:2"),
    ("", "bad.csv"),
])
def test_bad_input_names_where(tmp_path, text, field):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_history(str(path))
    assert err.value.field.endswith(field)


def test_unknown_task_is_a_config_error(tmp_path):
    res = run_rswap("plot", SHIPPED, "--output", str(tmp_path / "x.png"), "--task", "nope")
    assert res.returncode == 2 and "no series match" in res.stderr
