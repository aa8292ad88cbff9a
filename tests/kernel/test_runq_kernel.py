"""The run-queue delay collector on the real kernel: a sleeper that wakes every millisecond
beside spinners on every CPU shows its delays in its own cgroup, and the spinners' preemption
waits (runnable, not running) in theirs."""
from __future__ import annotations

import os
import sys
import time

import pytest

from rswap_ebpf.host.cpu.runq import MAPS, RunqCollector

from .helpers import TIME_SCALE, busy_process, scratch_cgroup

WAKER = [sys.executable, "-c", "import time\nend=time.monotonic()+60\n"
         "while time.monotonic()<end: time.sleep(0.001)"]


@pytest.fixture
def pin_dir(monkeypatch, unique_name):
    d = f"/sys/fs/bpf/test-{unique_name}"
    monkeypatch.setenv("RSWAP_PIN_DIR", d)
    yield d
    if os.path.isdir(d):
        for f in os.listdir(d):
            os.unlink(os.path.join(d, f))
        os.rmdir(d)


def test_delay_is_charged_to_the_woken_tasks_cgroup(pin_dir, unique_name):
    ncpu = len(os.sched_getaffinity(0))
    with scratch_cgroup(f"rswap-test-{unique_name}-spin") as spin, \
            scratch_cgroup(f"rswap-test-{unique_name}-wake") as wake, \
            scratch_cgroup(f"rswap-test-{unique_name}-empty") as empty, RunqCollector() as col:
        ids = {k: os.stat(d["unified"]).st_ino for k, d in
               (("spin", spin), ("wake", wake), ("empty", empty))}
        for name in MAPS:
            assert os.path.exists(os.path.join(pin_dir, name)), f"{name} not pinned"
        # two spinners per CPU: each waits out the other's slice (a millisecond or more)
        spinners = [busy_process(list(spin.values())) for _ in range(2 * ncpu)]
        procs = [s.__enter__() for s in spinners]
        try:
            with busy_process(list(wake.values()), WAKER):
                time.sleep(0.5 * TIME_SCALE)
                col.drain()
                time.sleep(2.0 * TIME_SCALE)
                delta = col.drain()
        finally:
            for s in spinners:
                s.__exit__(None, None, None)
    woken, spun = delta.of([ids["wake"]]), delta.of([ids["spin"]])
    # ~2000 wakeups in 2 s (fewer under load, never none); each waited on a busy CPU
    assert woken.n > 200, f"sleeper's wakeups not seen: {woken}"
    assert woken.total_ns > 0 and woken.quantile_us(0.5) >= 1.0
    # the spinners never sleep: their delays are the other spinner's slices on the same CPU
    # (a preemption by the sleeper alone is microseconds)
    assert spun.n > 10 and spun.quantile_us(0.99) >= 1000.0, spun
    assert delta.of([ids["empty"]]).n == 0
    assert procs  # spinners ran


def test_open_twice_and_close_leaves_no_pins(pin_dir):
    with RunqCollector():
        pass
    with RunqCollector():
        pass
    assert not os.path.isdir(pin_dir) or not os.listdir(pin_dir)
