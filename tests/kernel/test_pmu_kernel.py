"""The real bpf/pmu.bpf.c accounting, driven by replayed counter values.

The program is built with RSWAP_PMU_REPLAY (counters read from a BPF array this test fills) and
RSWAP_PMU_TEST_RUN (not attached; executed with BPF_PROG_TEST_RUN on the calling thread, which is
then `current`: tests/kernel/pmu_test_run.py), so each run_switch() is one sched_switch of this
process with known counter values.
"""
from __future__ import annotations

import os

import pytest

from tests.kernel.pmu_test_run import PmuTestRun

pytestmark = pytest.mark.kernel


@pytest.fixture
def pinned_cpu():
    old = os.sched_getaffinity(0)
    cpu = min(old)
    os.sched_setaffinity(0, {cpu})
    yield cpu
    os.sched_setaffinity(0, old)


@pytest.fixture
def pin_dir(unique_name, monkeypatch):
    d = f"/sys/fs/bpf/rswap-test-{unique_name}"
    monkeypatch.setenv("RSWAP_PIN_DIR", d)
    yield d
    assert not os.path.exists(d)


def replay(col, values):
    for misses, refs in values:
        col.set_counters(misses, refs)
        col.run_switch()


def test_each_switch_charges_the_previous_slice(pinned_cpu, pin_dir):
    with PmuTestRun() as col:
        assert os.path.exists(os.path.join(pin_dir, "rswap_pmu_task"))
        replay(col, [(100, 1000), (150, 1300), (175, 1400)])
        d = col.drain()
        me = d.task[os.getpid()]
        assert (me.misses, me.refs, me.slices) == (75, 400, 2)
        assert sum(c.misses for c in d.cgroup.values()) == 75
        # Drained: the next drain starts from zero, and the per-CPU baseline is kept.
        replay(col, [(180, 1500)])
        me = col.drain().task[os.getpid()]
        assert (me.misses, me.refs, me.slices) == (5, 100, 1)


def test_counter_going_backwards_is_not_charged(pinned_cpu, pin_dir):
    with PmuTestRun() as col:
        replay(col, [(1000, 5000), (10, 20), (30, 50)])
        d = col.drain()
        me = d.task[os.getpid()]
        assert (me.misses, me.refs, me.slices) == (20, 30, 1)
        assert d.dropped == {"counter_reset": 1}


def test_sampling_measures_every_nth_slice_and_scales(pinned_cpu, pin_dir):
    with PmuTestRun(sample=4) as col:
        # Switch numbers 1..9 on this CPU; slices starting at switches 4 and 8 are measured.
        replay(col, [(i * 10, i * 100) for i in range(1, 10)])
        me = col.drain().task[os.getpid()]
        assert me.slices == 2
        assert me.misses == 2 * 10 * 4 and me.refs == 2 * 100 * 4


def test_multiplexed_counter_is_scaled_by_enabled_over_running(pinned_cpu, pin_dir):
    """perf_event_open(2): a multiplexed counter ran only time_running of time_enabled; the
    slice's growth is scaled by their ratio (as perf scales a count) and the fraction reported."""
    with PmuTestRun() as col:
        for misses, refs, enabled, running in [(100, 1000, 1_000, 1_000),
                                               (150, 1300, 3_000, 2_000),   # ran 1/2: x2
                                               (160, 1340, 4_000, 3_000)]:  # not multiplexed
            col.set_counters(misses, refs, enabled, running)
            col.run_switch()
        d = col.drain()
        me = d.task[os.getpid()]
        assert (me.misses, me.refs, me.slices) == (50 * 2 + 10, 300 * 2 + 40, 2)
        assert d.running_fraction == pytest.approx(2_000 / 3_000)
        assert col.drain().running_fraction is None   # nothing measured since
