"""The long-season traces recorded here (tests/data/long, tools/record_traces.py --long): real
programs at a 0.5 s tick, periods of 60 to 3,600 ticks.  They read in the documented format and
the period search finds each program's period (the raw search up to 120 ticks, the bucket search
beyond), near the one it was recorded with: the host's load made some ticks late, so a period
counted in ticks comes out a few percent short."""
from __future__ import annotations

import importlib.util
import pathlib

import pytest

from rswap_ebpf.offline.trace import read_trace
from rswap_ebpf.predict.longseason import LongPeriodDetector
from rswap_ebpf.predict.period import PeriodDetector
from rswap_ebpf.predict.rollup import Rollups

ROOT = pathlib.Path(__file__).resolve().parents[3]
LONG = ROOT / "tests" / "data" / "long"


def _recorded():
    spec = importlib.util.spec_from_file_location("record_traces", ROOT / "tools" / "record_traces.py")
    import sys
    sys.path.insert(0, str(ROOT / "tools"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return {n: int(round(p / mod.LONG_INTERVAL)) for n, (p, _) in mod.LONG.items() if p}


PERIODS = _recorded()


def test_every_long_trace_is_there():
    assert sorted(p.stem for p in LONG.glob("*.csv")) == sorted(PERIODS)


@pytest.mark.parametrize("name", sorted(PERIODS))
def test_the_period_it_was_recorded_with_is_found(name):
    tr = read_trace(str(LONG / f"{name}.csv"))
    period = PERIODS[name]
    assert tr.interval == pytest.approx(0.5, abs=0.01)
    assert len(tr.times) >= 2 * period + 600  # two periods and then some
    assert set(tr.tasks) == {name, "etl_steady"}
    series = tr.demand[(name, tr.resources[0])]
    if period <= 120:
        d = PeriodDetector(max_period=120, every=3)
        found = [d.update(y) for y in series][-1]
    else:
        r, d = Rollups(tick_s=0.5), LongPeriodDetector(min_ticks=120)
        for y in series:
            r.add(y)
            d.update(r)
        found = d.period
    assert 0.88 * period <= found <= 1.02 * period
