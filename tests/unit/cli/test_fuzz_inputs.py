"""Hostile input: trace files, co-processor probe output and control-socket requests.

Each input gives a clear error (an RswapError, one line) or a correct result: never another
exception (a traceback), a hang, or a partial change.
"""
from __future__ import annotations

import io
import math
import os
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rswap_ebpf.runtime import config
from rswap_ebpf.host.coproc.device import Coproc, CoprocSpec, ProbeError, parse_probe_output
from rswap_ebpf.errors import ConfigError, RswapError
from rswap_ebpf.model.resources import ResourceType
from rswap_ebpf.offline.trace import HEADER, read_trace

FAST = settings(max_examples=2000, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
RESOURCE_KEYS = [r.key for r in ResourceType]


def one_line(err: BaseException) -> None:
    text = str(err)
    assert text and "Traceback" not in text


# -- trace files (rswap replay / plot) ----------------------------------------------------------

@FAST
@given(st.binary(max_size=400))
def test_trace_from_random_bytes(tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "fuzz.csv"
    path.write_bytes(b"time,task,resource,units\n" + data if data[:1] != b"!" else data[1:])
    try:
        tr = read_trace(str(path))
    except ConfigError as err:
        one_line(err)
        return
    assert tr.times == tuple(sorted(tr.times))
    for series in tr.demand.values():
        assert len(series) == len(tr.times)
        assert all(math.isfinite(u) and u >= 0 for u in series)


cell = st.one_of(st.text(max_size=8), st.sampled_from(RESOURCE_KEYS),
                 st.floats(allow_nan=True, allow_infinity=True).map(repr),
                 st.integers(-10, 10**20).map(str))
row = st.lists(cell, min_size=0, max_size=6)


@FAST
@given(st.lists(row, max_size=12), st.sampled_from(["\n", "\r\n", "\r"]))
def test_trace_from_random_rows(tmp_path_factory, rows, newline):
    import csv

    path = tmp_path_factory.getbasetemp() / "rows.csv"
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator=newline)
    w.writerow(HEADER)
    for r in rows:
        w.writerow(r)
    path.write_bytes(buf.getvalue().encode("utf-8", "replace"))  # lone surrogates become '?'
    try:
        tr = read_trace(str(path))
    except ConfigError as err:
        one_line(err)
        return
    # Correct result: every accepted row is in the trace with its value (the last one for a
    # repeated time/task/resource).
    want: dict = {}
    for r in rows:
        if len(r) == 4:
            want[(float(r[0]), r[1], ResourceType.parse(r[2]))] = float(r[3])
    for (t, task, res), units in want.items():
        assert tr.demand[(task, res)][tr.times.index(t)] == units


def test_trace_with_a_huge_field_is_a_clear_error(tmp_path):
    path = tmp_path / "big.csv"
    path.write_text("time,task,resource,units\n1," + "x" * 200_000 + ",cpu,1\n")
    with pytest.raises(ConfigError):
        read_trace(str(path))


def test_trace_that_is_not_utf8_is_a_clear_error(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"time,task,resource,units\n1,caf\xe9,cpu,1\n")
    with pytest.raises(ConfigError, match="latin1.csv"):
        read_trace(str(path))


# -- co-processor probe output ------------------------------------------------------------------

TASKS = ["web", "batch", "db"]
probe_line = st.one_of(
    st.text(max_size=30),
    st.tuples(st.sampled_from(TASKS + ["other", ""]),
              st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr),
                        st.text(max_size=6), st.integers(-5, 10**30).map(str)))
    .map(lambda t: f"{t[0]} {t[1]}"))


@FAST
@given(st.lists(probe_line, max_size=10), st.sampled_from(["\n", "\r\n", "\x0b", "\x1c"]))
def test_probe_output_fuzz(lines, sep):
    text = sep.join(lines)
    try:
        out = parse_probe_output(text, TASKS, ("probe",))
    except ProbeError as err:
        one_line(err)
        assert "probe" in str(err)
        return
    assert set(out) == set(TASKS)
    assert all(math.isfinite(v) and v >= 0 for v in out.values())


def test_probe_that_prints_bytes_that_are_not_utf8_is_a_probe_error():
    spec = CoprocSpec("npu", 4, (sys.executable, "-c",
                                 "import sys; sys.stdout.buffer.write(b'web \\xff\\xfe 1\\n')"),
                      (), 5.0)
    with pytest.raises(ProbeError) as exc:
        Coproc(spec).probe({"web": [1]})
    one_line(exc.value)


def test_probe_that_never_answers_is_cut_at_its_timeout():
    spec = CoprocSpec("npu", 4, (sys.executable, "-c", "import time; time.sleep(30)"), (), 0.3)
    with pytest.raises(ProbeError, match="no answer within"):
        Coproc(spec).probe({"web": [1]})


# -- control-socket requests --------------------------------------------------------------------

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
name = st.one_of(st.sampled_from(["web", "batch", "new1", "new2", "../x", "", "a\nb"]), json_leaf)
limits = st.one_of(json_value, st.dictionaries(
    st.sampled_from(RESOURCE_KEYS + ["bogus"]),
    st.one_of(json_value, st.fixed_dictionaries({}, optional={
        "min": st.one_of(st.integers(-10, 5000), json_leaf),
        "max": st.one_of(st.integers(-10, 5000), json_leaf)})), max_size=3))
request = st.fixed_dictionaries(
    {"op": st.sampled_from(["status", "task.list", "task.add", "task.remove", "exec.allocate",
                            "exec.release", "nope"])},
    optional={"name": name, "priority": st.one_of(st.sampled_from(["critical", "normal", "batch"]),
                                                    json_leaf),
              "cgroup": st.one_of(st.sampled_from(["web", "spare", "../etc", ".", "/spare"]),
                                  json_leaf),
              "forecaster": st.one_of(st.sampled_from(["last_value", "ewma", "bogus"]), json_value),
              "limits": limits, "cpu": limits, "wait": json_leaf, "timeout": json_leaf,
              "pids": json_value, "id": json_value, "extra": json_value})


@pytest.fixture
def scheduler(tmp_path, rswap_env):
    """The real control-socket dispatcher over a daemon on a fake cgroup2 tree (replayed CPU)."""
    from rswap_ebpf.runtime.daemon import Daemon
    from rswap_ebpf.host.cgroup import CgroupMounts
    from rswap_ebpf.server.scheduler import Scheduler
    from tests.unit.server.test_metrics import CONFIG, TRACE, ReplayDriver

    cgroot = tmp_path / "cgroup"
    for n in ("web", "batch", "spare"):
        (cgroot / n).mkdir(parents=True)
        (cgroot / n / "cgroup.procs").write_text("")
    d = Daemon(config.parse(CONFIG), drivers=[ReplayDriver(TRACE)],
               mounts=CgroupMounts("unified", str(cgroot)), out=io.StringIO())
    d.start()
    s = Scheduler(d)
    try:
        d.tick()
        yield s
    finally:
        s.close()
        d.stop()


def daemon_state(d) -> tuple:
    return (sorted((n, rt.exited) for n, rt in d.tasks.items()),
            {r.key: dict(snap.allocations) for r, snap in d.pool.get_available_resources().items()},
            sorted(d.manager.tasks))


@settings(max_examples=1500, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(request)
def test_control_requests_fuzz(scheduler, req):
    from rswap_ebpf.server.control import Deferred, Peer

    req.pop("command", None)  # never let the fuzzer start programs
    d = scheduler.daemon
    before = daemon_state(d)
    try:
        reply = scheduler.dispatch(req, Peer(os.getpid(), 0, 0))
    except RswapError as err:
        one_line(err)
        assert daemon_state(d) == before, "an error reply left a partial change"
        return
    if isinstance(reply, Deferred):
        reply.cancel() if hasattr(reply, "cancel") else None
        return
    assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool)
    if not reply["ok"]:
        assert daemon_state(d) == before, "an error reply left a partial change"
        return
    # Whatever was added is taken away again, so every example starts from the same daemon.
    op = req["op"]
    if op in ("task.add", "exec.allocate") and reply.get("task") in d.tasks:
        d.remove_task(reply["task"])
    elif op in ("task.remove", "exec.release"):
        pass  # a configured task was removed: the daemon goes on without it
