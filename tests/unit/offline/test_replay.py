"""Record format and replay: the same SwapManager and forecasters over a trace, without root."""
from __future__ import annotations

import pathlib
import random

import pytest

from rswap_ebpf.cli.main import main
from rswap_ebpf.cli.trace import parse_spec
from rswap_ebpf.errors import ConfigError
from rswap_ebpf.predict.period import detect
from rswap_ebpf.cli.trace import format_table
from rswap_ebpf.offline.replay import default_totals, replay
from rswap_ebpf.model.resources import ResourceType
from rswap_ebpf.offline.trace import Trace, TraceWriter, read_trace
from rswap_ebpf.runtime import pipeline

CPU = ResourceType.PROCESSOR_CYCLES


def _periodic_trace(n=240, seed=1):
    rnd = random.Random(seed)
    web = tuple(max(0.0, (1400 if i % 12 < 4 else 60) + rnd.gauss(0, 60)) for i in range(n))
    batch = tuple(max(0.0, 600 + rnd.gauss(0, 30)) for _ in range(n))
    return Trace(tuple(float(i) for i in range(n)), {("web", CPU): web, ("batch", CPU): batch})


def _write(path, trace):
    with open(path, "w") as f:
        w = TraceWriter(f)
        for i, t in enumerate(trace.times):
            w.write_tick(t, [(task, r, s[i]) for (task, r), s in trace.demand.items()])


def test_trace_round_trip_and_pandas_readable_header(tmp_path):
    tr = _periodic_trace(30)
    path = tmp_path / "t.csv"
    _write(path, tr)
    assert path.read_text().splitlines()[0] == "time,task,resource,units"
    back = read_trace(str(path))
    assert back.times == tr.times
    assert back.interval == 1.0
    for k, s in tr.demand.items():
        assert back.demand[k] == pytest.approx(s, abs=0.06)


@pytest.mark.parametrize("body,where", [
    ("time,task,units\n", ":1"),
    ("time,task,resource,units\n1,a,cpu\n", ":2"),
    ("time,task,resource,units\n1,a,cpu,-4\n", ":2"),
    ("time,task,resource,units\n1,a,quarks,4\n", ":2"),
    ("time,task,resource,units\n", "t.csv"),
])
def test_bad_traces_name_the_line(tmp_path, body, where):
    p = tmp_path / "t.csv"
    p.write_text(body)
    with pytest.raises(ConfigError) as e:
        read_trace(str(p))
    assert where in e.value.field


def test_missing_task_ticks_count_as_zero(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("time,task,resource,units\n1,a,cpu,5\n2,a,cpu,6\n2,b,cpu,7\n")
    tr = read_trace(str(p))
    assert tr.demand[("b", CPU)] == (0.0, 7.0)
    assert default_totals(tr) == {CPU: 13}


def test_static_policy_is_equal_shares_and_accounting_adds_up():
    tr = _periodic_trace(50)
    res = replay(tr, ["static"], totals={CPU: 2000})
    for s in res.by_policy("static"):
        d = tr.demand[(s.task, CPU)]
        assert s.shortfall == pytest.approx(sum(max(0, v - 1000) for v in d))
        assert s.slack == pytest.approx(sum(max(0, 1000 - v) for v in d))
        assert s.changes == 0 and s.mae is None


def test_proactive_beats_reactive_on_a_periodic_trace():
    """Half the shortfall of the reactive baseline given the same slack budget: reactive's
    headroom is raised until it spends at least the slack proactive spends."""
    res = replay(_periodic_trace(), totals={CPU: 2500})
    short, slack = res.total("proactive", "shortfall"), res.total("proactive", "slack")
    assert short <= 0.5 * res.total("reactive", "shortfall")
    for h in (0.2, 0.5, 1.0, 2.0, 3.0):
        r = replay(_periodic_trace(), ["reactive"], totals={CPU: 2500}, headroom=h)
        if r.total("reactive", "slack") >= slack:
            assert short <= 0.5 * r.total("reactive", "shortfall")
            break
    else:
        pytest.fail("no reactive headroom spent proactive's slack")
    web = next(s for s in res.by_policy("proactive") if s.task == "web")
    assert web.model != "last_value" and web.mae is not None
    table = format_table(res)
    for p in ("static", "reactive", "vpa", "proactive"):
        assert p in table


def test_priorities_make_swaps_from_batch():
    from rswap_ebpf.model.limits import Priority

    tr = _periodic_trace(120)
    tight = replay(tr, ["reactive"], totals={CPU: 1500},
                   priorities={"web": Priority.CRITICAL, "batch": Priority.BATCH})
    assert sum(s.swaps for s in tight.scores) > 0


def test_parse_spec():
    assert parse_spec("auto") == "auto"
    assert parse_spec("holt_winters:seasonality=12,alpha=0.3,x=y") == {
        "name": "holt_winters", "seasonality": 12, "alpha": 0.3, "x": "y"}
    assert parse_spec("auto:seasonal_raise=false")["seasonal_raise"] is False


def test_cli_replay_prints_the_table(tmp_path, capsys):
    p = tmp_path / "t.csv"
    _write(p, _periodic_trace(80))
    assert main(["replay", str(p), "--policy", "reactive", "--policy", "proactive",
                 "--forecaster", "seasonal_naive:period=12"]) == 0
    out = capsys.readouterr().out
    assert "SHORT/reactive" in out and "seasonal_naive" in out


def test_cli_replay_reading_changes_what_a_throttled_tick_shows(tmp_path, capsys):
    """--reading reaches the replay: on a trace of bursts, the growth rule starves reactive
    more than the demand reading does (it climbs x2 a tick instead of catching up at once)."""
    p = tmp_path / "t.csv"
    _write(p, _periodic_trace(80))
    shortfall = {}
    for reading in ("demand", "growth"):
        assert main(["replay", str(p), "--policy", "reactive", "--reading", reading]) == 0
        total = capsys.readouterr().out.strip().splitlines()[-1].split()
        assert total[0] == "reactive"
        assert total[1] == "cpu"  # one line per resource, in its unit
        shortfall[reading] = float(total[2])
    assert shortfall["growth"] > 1.5 * shortfall["demand"]


def test_cli_replay_bad_input_exits_2(tmp_path, capsys):
    p = tmp_path / "t.csv"
    _write(p, _periodic_trace(10))
    assert main(["replay", str(p), "--forecaster", "oracle"]) == 2
    assert main(["replay", str(p), "--total", "cpu"]) == 2
    assert main(["replay", str(tmp_path / "none.csv")]) == 2
    with pytest.raises(SystemExit) as e:  # argparse's own check of the choices
        main(["replay", str(p), "--reading", "guess"])
    assert e.value.code == 2


def test_replay_learns_what_the_daemon_would_see(monkeypatch):
    """A capped task shows at most its allocation: replay feeds every policy the manager's
    observed_demand of that capped use (the daemon's path).  Without the kernel's throttled
    time (``reading="growth"``) reactive ramps up by the manager's growth factor instead of
    jumping to a demand it could not have seen; with it, a busy thread held at the cpu quota
    floor reads as the whole CPU it waited for, and reactive catches up in one tick (both
    readings agree on a busy thread)."""
    from rswap_ebpf.swap.manager import SwapManager

    calls = []
    real = SwapManager.observed_demand

    def spy(self, task, r, used, censored=None, withheld=None):
        calls.append((task, used, censored, withheld))
        return real(self, task, r, used, censored, withheld)

    monkeypatch.setattr(SwapManager, "observed_demand", spy)
    step = Trace(tuple(float(i) for i in range(12)), {("a", CPU): (0.0,) * 2 + (1000.0,) * 10})
    res = replay(step, ["reactive"], totals={CPU: 2000}, reading="growth")
    assert len(calls) == 12
    assert calls[0] == ("a", 0.0, False, None)      # the first tick runs uncapped
    assert calls[2] == ("a", 10.0, True, None)      # held at 0: the cpu quota floor, throttled
    assert all(used < 1000 and censored for _, used, censored, _ in calls[2:7])
    (s,) = res.scores
    assert s.shortfall > 3 * 1000                   # several ticks to ramp, not one
    assert s.changes >= 5

    for reading in ("demand", "backlog"):
        calls.clear()
        (s,) = replay(step, ["reactive"], totals={CPU: 2000}, reading=reading).scores
        assert calls[2] == ("a", 10.0, True, pytest.approx(990.0))  # the rest of a CPU
        assert all(not censored for _, _, censored, _ in calls[3:])
        assert s.shortfall == pytest.approx(1000.0)  # the one tick the step was unforeseen
        assert s.changes == 1
    with pytest.raises(ConfigError):
        replay(step, ["reactive"], reading="guess")


def test_the_throttled_reading_models():
    """Use + throttled time as replay models it (tools/measure_throttle.py): ``backlog`` reads a
    busy thread as its demand at any cap and a half-busy one from its demand (cap there) to a
    whole CPU (cap 0), linearly in the share held back; ``demand`` is the demand; neither reads
    above the host."""
    from rswap_ebpf.offline.replay import throttled_reading

    assert throttled_reading(2000.0, 200.0, 4000) == pytest.approx(2000.0)
    assert throttled_reading(1000.0, 10.0, 4000) == pytest.approx(1000.0)
    assert throttled_reading(500.0, 500.0, 4000) == pytest.approx(500.0)
    assert throttled_reading(500.0, 200.0, 4000) == pytest.approx(500.0 + 0.6 * 500.0)
    assert throttled_reading(500.0, 0.0, 4000) == pytest.approx(1000.0)
    assert throttled_reading(1500.0, 0.0, 1800) == pytest.approx(1800.0)
    assert throttled_reading(500.0, 200.0, 4000, "demand") == pytest.approx(500.0)
    assert throttled_reading(2500.0, 200.0, 1800, "demand") == pytest.approx(1800.0)
    import numpy as np
    arr = throttled_reading(np.array([500.0, 2000.0]), np.array([200.0, 200.0]), 4000)
    assert list(arr) == pytest.approx([800.0, 2000.0])


def test_auto_is_scored_over_the_replay_window():
    from rswap_ebpf.offline.replay import _scored_over

    assert _scored_over(None, 3) == {"name": "auto", "horizon": 3}
    assert _scored_over({"name": "auto", "quantile": 0.5}, 1) == {
        "name": "auto", "quantile": 0.5, "horizon": 1}
    assert _scored_over({"name": "auto", "horizon": 5}, 1)["horizon"] == 5
    assert _scored_over("last_value", 1) == "last_value"


def test_clairvoyant_bound_is_below_every_policy_replayed():
    """The dynamic program's least shortfall + lam * slack is a lower bound: every policy replayed
    on the daemon's path (no pool contention here) costs at least that, and the dual bound on
    shortfall at a policy's own slack is never above that policy's shortfall."""
    from rswap_ebpf.offline.scoring import clairvoyant_bound, least_cost

    tr = _periodic_trace(60)
    totals = {CPU: 4000}  # room for both: the per-task bound assumes the pool never binds
    for policy, kw in (("reactive", {}), ("vpa", {}), ("proactive", {"forecaster": "auto"}),
                       ("reactive", {"headroom": 1.0})):
        res = replay(tr, [policy], totals=totals, **kw)
        for s in res.scores:
            for lam in (0.0, 0.1, 1.0, 10.0):
                v = least_cost(list(tr.demand[(s.task, CPU)]), totals[CPU], lam, 10.0)
                assert v <= s.shortfall + lam * s.slack + 1e-6
    # a trace whose demand only ever drops after one tick: covering it costs the drop in slack
    step = Trace((0.0, 1.0, 2.0, 3.0), {("a", CPU): (0.0, 500.0, 0.0, 0.0)})
    assert least_cost([0.0, 500.0, 0.0, 0.0], 500, 1.0, 10.0) == pytest.approx(500.0)
    assert clairvoyant_bound(step, CPU, 0.0) > 0  # with no slack at all, something goes short


def test_at_equal_slack_reads_reactives_frontier_between_its_headrooms():
    from rswap_ebpf.offline.replay import at_equal_slack
    # (slack, shortfall) at four headrooms; the third is worse than the second (a grid wobble)
    pts = [(100.0, 900.0), (300.0, 500.0), (400.0, 600.0), (700.0, 200.0)]
    assert at_equal_slack(pts, 50.0) is None  # reactive never spends this little
    assert at_equal_slack(pts, 100.0) == pytest.approx(900.0)
    assert at_equal_slack(pts, 200.0) == pytest.approx(700.0)  # halfway along 900 -> 500
    # the wobble is off the envelope: from (300, 500) straight to (700, 200)
    assert at_equal_slack(pts, 400.0) == pytest.approx(425.0)
    assert at_equal_slack(pts, 5000.0) == pytest.approx(200.0)  # beyond: the least measured
    assert at_equal_slack([], 10.0) is None


def test_cli_replay_compares_at_equal_slack(tmp_path, capsys):
    """With reactive and proactive both run, the last table divides proactive's shortfall by
    reactive's at proactive's slack, per task and in total, from reactive replayed at every
    headroom; --headroom changes reactive's row above, not that comparison."""
    from rswap_ebpf.offline.replay import at_equal_slack, reactive_frontier
    p = tmp_path / "t.csv"
    trace = _periodic_trace(120)
    _write(p, trace)
    outs = []
    for headroom in ("0.2", "1.0"):
        assert main(["replay", str(p), "--policy", "reactive", "--policy", "proactive",
                     "--headroom", headroom]) == 0
        outs.append(capsys.readouterr().out)
    tables = [o[o.index("At equal slack"):] for o in outs]
    assert tables[0] == tables[1]
    rows = {line.split()[0]: line.split() for line in tables[0].splitlines()[3:]}
    assert set(rows) == {"web", "batch", "(all"}  # "(all tasks)": the tasks of cpu, summed
    res = replay(read_trace(str(p)), ("proactive",))
    front = reactive_frontier(read_trace(str(p)))
    web = next(s for s in res.by_policy("proactive") if s.task == "web")
    for task, sc in (("web", web), ("(all", None)):
        pts = front[("web", CPU) if sc else CPU]
        slack = sc.slack if sc else res.total("proactive", "slack", CPU)
        short = sc.shortfall if sc else res.total("proactive", "shortfall", CPU)
        at = at_equal_slack(pts, slack)
        below = at is None  # proactive spends less than reactive at no headroom
        if below:
            at = pts[0][1]  # reactive at no headroom
        assert rows[task][-1].startswith("<") == below
        assert float(rows[task][-2]) == pytest.approx(at, abs=0.5)
        assert rows[task][-1].lstrip("<") == f"{short / at:.2f}"
    # without reactive there is nothing to compare with: no table
    assert main(["replay", str(p), "--policy", "proactive"]) == 0
    assert "At equal slack" not in capsys.readouterr().out


_DATA = pathlib.Path(__file__).resolve().parents[2] / "data"


@pytest.mark.parametrize("path", sorted(_DATA.glob("*.csv")) + sorted(_DATA.glob("holdout/*.csv")),
                         ids=lambda p: str(p.relative_to(_DATA)))
def test_shipped_traces_read_and_repeat(path):
    """Every shipped trace (and held-out one) is in the documented format, 150 one-second ticks
    of two tasks, and at least one of its tasks repeats: the detector finds a period in it."""
    tr = read_trace(str(path))
    assert len(tr.times) == 150 and tr.interval == pytest.approx(1.0, abs=0.05)
    assert len({task for task, _ in tr.demand}) == 2
    periods = [detect(list(s), max_period=60)[0] for s in tr.demand.values()]
    assert max(periods) >= 2, periods


def _with_late_ticks(trace, every=9, seed=3):
    """The trace as a loaded recorder writes it: now and then a tick comes a slot late and the
    sample for the slot it skipped is missing (the times say so)."""
    rnd = random.Random(seed)
    keep = [i for i in range(len(trace.times)) if i < 24 or rnd.randrange(every)]
    return Trace(tuple(trace.times[i] for i in keep),
                 {k: tuple(s[i] for i in keep) for k, s in trace.demand.items()})


def _sn_mae(trace):
    res = replay(trace, ["proactive"], forecaster=parse_spec("seasonal_naive:period=12"), totals={CPU: 2500})
    return next(s for s in res.by_policy("proactive") if s.task == "web").mae


def test_late_ticks_keep_the_seasons_phase(monkeypatch):
    """A season counts ticks of the clock, not samples: with one tick in nine late, a 12-tick
    seasonal-naive forecast stays close to its error on the trace without them (a late sample
    is still scored against the forecast for the slot before it); counted in samples, each late
    tick would move the phase by one and the error would grow several times."""
    full = _periodic_trace(480)
    late = _with_late_ticks(full)
    assert len(late.times) < 0.95 * len(full.times)
    by_clock = _sn_mae(late)
    assert by_clock <= 2 * _sn_mae(full)
    monkeypatch.setattr(pipeline.SlotClock, "slots", lambda self, now: 1)
    assert _sn_mae(late) > 3 * by_clock  # the same trace, sample-counted: the phase slides
