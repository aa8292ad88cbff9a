"""Scoring per resource (offline/scoring.py, ``rswap replay --json``): every figure in one unit."""
from __future__ import annotations

import json
import random

import pytest

from rswap_ebpf.cli.main import main
from rswap_ebpf.model.resources import ResourceType
from rswap_ebpf.cli.trace import format_equal_slack, format_table
from rswap_ebpf.offline.replay import equal_slack_ratio, reactive_frontier, replay
from rswap_ebpf.offline.scoring import one_step_mae, score
from rswap_ebpf.offline.trace import Trace, TraceWriter

CPU = ResourceType.PROCESSOR_CYCLES
IO = ResourceType.STORAGE_IOPS


def _two_unit_trace(n=240, seed=3) -> Trace:
    """A periodic CPU task, a steady one, and a periodic IO task whose numbers are 100x larger:
    a cross-unit total would be decided by the IO alone."""
    rnd = random.Random(seed)
    web = tuple(max(0.0, (1400 if i % 12 < 4 else 60) + rnd.gauss(0, 60)) for i in range(n))
    batch = tuple(max(0.0, 600 + rnd.gauss(0, 30)) for _ in range(n))
    flush = tuple(max(0.0, (90000 if i % 20 < 5 else 2000) + rnd.gauss(0, 500)) for i in range(n))
    return Trace(tuple(float(i) for i in range(n)),
                 {("web", CPU): web, ("batch", CPU): batch, ("flush", IO): flush})


def _write(path, trace):
    with open(path, "w") as f:
        w = TraceWriter(f)
        for i, t in enumerate(trace.times):
            w.write_tick(t, [(task, r, s[i]) for (task, r), s in trace.demand.items()])


def test_each_resource_is_scored_over_its_own_tasks_only():
    tr = _two_unit_trace()
    res = replay(tr, ("proactive",))
    front = reactive_frontier(tr)
    out = score(res, front)
    assert set(out["resources"]) == {"cpu", "io"}
    for r, key in ((CPU, "cpu"), (IO, "io")):
        short = sum(s.shortfall for s in res.by_policy("proactive") if s.resource == r)
        slack = sum(s.slack for s in res.by_policy("proactive") if s.resource == r)
        at, _ = equal_slack_ratio(front[r], short, slack)
        got = out["resources"][key]
        assert got["shortfall"] == pytest.approx(short, abs=0.1)
        assert got["ratio_at_equal_slack"] == pytest.approx(short / at, abs=1e-3)
        # reactive's frontier of this resource is its own tasks' sum, not the trace's
        assert front[r][0][1] == pytest.approx(sum(
            s.shortfall for s in replay(tr, ("reactive",), headroom=0.0).by_policy("reactive")
            if s.resource == r))
    assert out["resources"]["cpu"]["mae"]["period"] == {"batch": 0, "web": 12}
    assert out["resources"]["io"]["mae"]["period"] == {"flush": 20}
    assert set(out["tasks"]) == {"web", "batch", "flush"}
    assert set(out["tasks"]["flush"]) == {"io"}
    # the summed MAE of a resource is its tasks' MAEs summed
    cpu_sn = sum(out["tasks"][t]["cpu"]["mae"]["seasonal_naive"] for t in ("web", "batch"))
    assert out["resources"]["cpu"]["mae"]["seasonal_naive"] == pytest.approx(cpu_sn, abs=0.01)


def test_a_trace_of_several_resources_has_no_total_across_them():
    tr = _two_unit_trace(120)
    res = replay(tr, ("reactive", "proactive"))
    with pytest.raises(ValueError):
        res.total("reactive", "shortfall")  # millicores + IO/s: refused
    table = format_table(res)
    summary = table.split("\n\n")[1].splitlines()[1:]
    assert sorted(line.split()[:2] for line in summary) == [
        ["proactive", "cpu"], ["proactive", "io"], ["reactive", "cpu"], ["reactive", "io"]]
    eq = format_equal_slack(res, reactive_frontier(tr))
    assert "(total)" not in eq and eq.count("(all tasks)") == 2


def test_cli_json_and_the_pinned_baseline_spelling(tmp_path, capsys):
    p = tmp_path / "t.csv"
    _write(p, _two_unit_trace(160))
    assert main(["replay", str(p), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"cpu", "io"} == set(out["resources"])
    assert isinstance(out["resources"]["cpu"]["ratio_at_equal_slack"], float)
    assert main(["replay", str(p), "--policy", "proactive", "--forecaster",
                 "seasonal_naive:period=12", "--json"]) == 0
    pinned = json.loads(capsys.readouterr().out)
    web = pinned["tasks"]["web"]["cpu"]
    assert web["model"] == "seasonal_naive"
    # given its period, "chosen" is that seasonal-naive: the same figure as the baseline's
    assert web["mae"]["chosen"] == pytest.approx(web["mae"]["seasonal_naive"], abs=1e-3)
    assert "ratio_at_equal_slack" in pinned["resources"]["cpu"]


def test_one_step_mae_counts_every_tick_after_the_first():
    assert one_step_mae("last_value", [0.0, 10.0, 10.0, 0.0], 100) == pytest.approx(20 / 3)


def _bursts(n=80, seed=2):
    rnd = random.Random(seed)
    return [max(0.0, (400 if i % 9 < 3 else 20) + rnd.gauss(0, 40)) for i in range(n)]


@pytest.mark.parametrize("reading", ["growth", "demand", "backlog"])
def test_the_coarse_bound_is_below_the_exact_one(reading):
    """Cut into cells, the program is a relaxation: never above the exact least cost (where it
    is not far below it with enough cells)."""
    from rswap_ebpf.offline.scoring import least_cost, least_costs

    s = _bursts()
    lams = [0.0, 0.1, 1.0, 10.0]
    exact = least_costs(s, 600, lams, 10.0, reading=reading)
    assert exact[2] == pytest.approx(least_cost(s, 600, 1.0, 10.0, reading=reading))
    for levels in (16, 64, 300):
        coarse = least_costs(s, 600, lams, 10.0, reading=reading, levels=levels)
        assert all(c <= e + 1e-6 for c, e in zip(coarse, exact))
    fine = least_costs(s, 600, lams, 10.0, reading=reading, levels=300)
    assert fine[2] >= 0.8 * exact[2]


def test_the_bound_of_a_huge_pool_does_not_walk_its_units():
    """A net pool of 10^9 bytes/s: walked unit by unit the program needs 8 GB per row; in cells
    it runs as for any other pool, per resource."""
    from rswap_ebpf.offline.scoring import clairvoyant_bound

    NET = ResourceType.NETWORK_BANDWIDTH
    rnd = random.Random(4)
    net = tuple(max(0.0, (9e8 if i % 10 < 3 else 1e7) + rnd.gauss(0, 1e6)) for i in range(60))
    tr = Trace(tuple(float(i) for i in range(60)), {("push", NET): net,
                                                     ("web", CPU): tuple(_bursts(60))})
    (react,) = [s for s in replay(tr, ("reactive",)).scores if s.resource == NET]
    b = clairvoyant_bound(tr, NET, react.slack)
    assert 0 < b <= react.shortfall  # reactive is one policy on the path: not below the bound
    assert clairvoyant_bound(tr, CPU, 0.0) < 1e6  # CPU alone: not summed with the bytes


def test_cli_json_takes_the_recordings_own_period(tmp_path, capsys):
    p = tmp_path / "t.csv"
    _write(p, _two_unit_trace(160))
    assert main(["replay", str(p), "--policy", "proactive", "--json", "--period", "web=24"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["resources"]["cpu"]["mae"]["period"] == {"batch": 0, "web": 24}
    assert main(["replay", str(p), "--json", "--period", "web=x"]) == 2
