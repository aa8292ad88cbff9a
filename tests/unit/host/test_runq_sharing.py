"""Which sched_switch builds carry the run-queue half, and which open CPU collector a run-queue
collector shares (no kernel: the collectors' own bookkeeping, bcc never called)."""
from __future__ import annotations

import doctest
import weakref

import pytest

from rswap_ebpf.host import bpf
from rswap_ebpf.host.cpu.collector import CpuCollector

RAW, TRACEFS = bpf.SCHED_SWITCH


def test_doctests():
    assert doctest.testmod(bpf).failed == 0


@pytest.mark.parametrize("release, raw, tracefs", [
    ("6.18.44-fc-v1272", True, True),
    ("5.18.0", True, True),
    ("5.17.15-arch1", False, True),   # the raw tracepoint has no prev_state argument yet
    ("4.19.0-27-amd64", False, True),
    ("garbage", False, True),
])
def test_prev_state_is_seen_on_tracefs_always_and_on_the_raw_tracepoint_from_5_18(
        monkeypatch, release, raw, tracefs):
    monkeypatch.setattr(bpf, "kernel_at_least",
                        lambda major, minor, rel=None, _f=bpf.kernel_at_least: _f(major, minor, release))
    assert bpf.sched_switch_has_prev_state(RAW) is raw
    assert bpf.sched_switch_has_prev_state(TRACEFS) is tracefs


def _opened(col: CpuCollector, runq_half: bool = True) -> CpuCollector:
    """What open() leaves behind for this choice: a loaded program (any object) and, when its
    program carries the run-queue half, a place in the hosts."""
    col._bpf, col.runq_half = object(), runq_half
    if runq_half:
        CpuCollector._runq_hosts.append(weakref.ref(col))
    return col


def test_the_newest_open_collector_with_a_free_run_queue_half_is_shared(monkeypatch):
    monkeypatch.setattr(CpuCollector, "_runq_hosts", [])
    assert CpuCollector.runq_host() is None
    old, new = _opened(CpuCollector()), _opened(CpuCollector())
    _opened(CpuCollector(runq=False), runq_half=False)
    assert CpuCollector.runq_host() is new
    new.runq_shared = True  # a run-queue collector already uses it
    assert CpuCollector.runq_host() is old
    old._bpf = None          # closed (close() also drops it from the hosts)
    assert CpuCollector.runq_host() is None


def test_sharing_a_program_without_the_half_is_refused():
    col = _opened(CpuCollector(runq=False), runq_half=False)
    with pytest.raises(RuntimeError, match="no run-queue half"):
        col.share_runq()
