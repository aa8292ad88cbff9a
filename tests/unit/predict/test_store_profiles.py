"""Profiles in SQLite: restart, kill -9 and retention."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from rswap_ebpf.predict.registry import make_forecaster
from rswap_ebpf.predict.profile import TaskProfiler
from rswap_ebpf.predict.store import ProfileStore, Retention, task_identity
from rswap_ebpf.model.resources import ResourceType

CPU = ResourceType.PROCESSOR_CYCLES
IO = ResourceType.STORAGE_IOPS


def y(i):
    return 1500.0 if i % 12 < 4 else 50.0 + (i * 7919) % 37


def profiler(store, **kw):
    return TaskProfiler(lambda t, r: make_forecaster("auto", scale=2000), store=store, **kw)


def test_restart_resumes_forecasts_exactly(tmp_path):
    db = str(tmp_path / "p.db")
    ref = profiler(None)
    with ProfileStore(db) as st:
        p = profiler(st, checkpoint_every=25)
        for i in range(130):  # the last checkpoint is at 125: five samples replay on load
            for prof in (p, ref):
                prof.update_prediction("web", CPU, y(i))
                prof.update_prediction("web", IO, y(i + 3) / 10)
            p.flush(1000.0 + i)
    with ProfileStore(db) as st:
        p2 = profiler(st)
        assert sorted(r.key for r in p2.restore("web")) == ["cpu", "io"]
        got = p2.get_predicted_needs("web", 6)  # before any new sample
        want = ref.get_predicted_needs("web", 6)
        for r in (CPU, IO):
            assert got[r].series == pytest.approx(want[r].series)
            assert got[r].model == want[r].model
            assert got[r].samples == want[r].samples


def test_a_task_that_starts_again_has_its_earlier_profile(tmp_path):
    with ProfileStore(str(tmp_path / "p.db")) as st:
        p = profiler(st)
        for i in range(100):
            p.update_prediction("nightly", CPU, y(i))
            p.flush(2000.0 + i)
        p.forget("nightly")  # the task exited: checkpointed, dropped from memory
        assert "nightly" not in p.tasks()
        assert p.get_predicted_needs("nightly", 3) == {}
        p.restore("nightly")
        pred = p.get_predicted_needs("nightly", 12)[CPU]
        assert pred.samples == 100
        assert max(pred.series) > 1000  # it remembers the bursts


def test_kill_9_loses_at_most_the_tick_in_flight(tmp_path):
    db = str(tmp_path / "p.db")
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.getcwd()!r})
        from tests.unit.predict.test_store_profiles import profiler, y, CPU
        from rswap_ebpf.predict.store import ProfileStore
        st = ProfileStore({db!r})
        p = profiler(st, checkpoint_every=7)
        i = 0
        while True:
            p.update_prediction("web", CPU, y(i))
            p.flush(100.0 + i)
            print(i, flush=True)
            i += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        last = -1
        for line in proc.stdout:
            last = int(line)
            if last >= 60:
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    with ProfileStore(db) as st:
        p = profiler(st)
        p.restore("web")
        n = p.profiles[("web", CPU)].history
        kept = len(n)
    assert last + 1 <= kept <= last + 2  # every reported tick, plus at most the one in flight
    ref = profiler(None)
    for i in range(kept):
        ref.update_prediction("web", CPU, y(i))
    assert p.get_predicted_needs("web", 5)[CPU].series == pytest.approx(
        ref.get_predicted_needs("web", 5)[CPU].series)


def test_samples_fold_into_rollups_and_retention_drops_old(tmp_path):
    with ProfileStore(str(tmp_path / "p.db"), Retention(days=1, rollup_s=60)) as st:
        p = profiler(st, checkpoint_every=10)
        t0 = 1_000_000.0
        for i in range(300):
            p.update_prediction("a", CPU, 100.0 + i % 10)
            p.flush(t0 + i)
        raw = st.db.execute("SELECT COUNT(*) FROM sample").fetchone()[0]
        assert raw < 10  # only what the last checkpoint does not cover
        hist = st.history("a", "cpu")
        assert sum(h[3] for h in hist) == 300
        assert all(h[2] >= h[1] for h in hist)
        assert len(hist) <= 6 + raw
        st.prune(t0 + 2 * 86400)
        assert st.history("a", "cpu") == []
        assert st.identities() == []


def test_task_identity():
    assert task_identity("web", ("nginx",)) == "web"
    assert task_identity(None, ("nginx", "-g", "daemon off;")) == "cmd:nginx -g daemon off;"
    long = task_identity(None, ["x" * 200])
    assert len(long) < 120 and long == task_identity(None, ["x" * 200])


def test_wal_mode(tmp_path):
    with ProfileStore(str(tmp_path / "p.db")) as st:
        assert st.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_checkpoints_are_data_and_as_compact_as_a_compressed_pickle():
    import json
    import pickle
    import zlib

    from rswap_ebpf.predict.checkpoint import MAGIC
    from rswap_ebpf.predict.profile import freeze, thaw

    p = profiler(None)
    for i in range(400):
        p.update_prediction("web", CPU, y(i))
    prof = p.profiles[("web", CPU)]
    blob = freeze(prof)
    assert blob.startswith(MAGIC)
    json.loads(zlib.decompress(blob[len(MAGIC):]))  # plain JSON inside
    assert len(blob) < 1.5 * len(zlib.compress(pickle.dumps(prof, protocol=5), 6))
    back = thaw(blob)
    assert back.forecast(6) == prof.forecast(6)
    assert back.forecaster._detector._buf == prof.forecaster._detector._buf


def test_a_pickle_in_the_database_is_never_unpickled(tmp_path, capsys):
    """A profiles.db whose checkpoint is a pickle (an older rswap's, or planted): refused, the
    profile relearnt from the samples after it, and the pickle's code never runs."""
    import pickle
    import zlib

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    db = str(tmp_path / "p.db")
    with ProfileStore(db) as st:
        st.write_tick(1.0, [], [("web", "cpu", pickle.dumps(Exploit()), "x", None)])
        st.write_tick(2.0, [("web", "cpu", 70.0)])
        st.db.execute("INSERT OR REPLACE INTO state VALUES (2, 1.0, 'x', NULL, ?)",
                      (b"RZ1" + zlib.compress(pickle.dumps(Exploit())),))
        st.write_tick(2.0, [("web", "io", 7.0)])
    with ProfileStore(db) as st:
        p = profiler(st)
        assert sorted(r.key for r in p.restore("web")) == ["cpu", "io"]
        assert list(p.profiles[("web", CPU)].history) == [70.0]
        assert list(p.profiles[("web", IO)].history) == [7.0]
    assert not marker.exists()
    err = capsys.readouterr().err
    assert "not a checkpoint of this format" in err and "web/cpu" in err and "web/io" in err


def test_a_checkpoint_naming_a_class_outside_the_allow_list_is_refused():
    import json
    import zlib

    from rswap_ebpf.predict.checkpoint import MAGIC, CheckpointError, loads

    for name in ("os:system", "subprocess:Popen", "builtins:eval",
                 "rswap_ebpf.predict.profile:os", "rswap_ebpf.predict.profile:__builtins__"):
        blob = MAGIC + zlib.compress(json.dumps({"$o": name, "i": 0, "s": {}}).encode())
        with pytest.raises(CheckpointError):
            loads(blob)
    with pytest.raises(CheckpointError):
        loads(MAGIC + b"garbage")


def test_a_restart_after_a_gap_keeps_the_seasonal_phase(tmp_path, monkeypatch):
    """Down for 5 ticks of a 10-tick period: the restored model expects the burst 5 ticks sooner."""
    import time as _time

    from rswap_ebpf.predict.registry import make_forecaster
    from rswap_ebpf.predict.profile import TaskProfiler
    from rswap_ebpf.predict.store import ProfileStore
    from rswap_ebpf.model.resources import ResourceType

    cpu = ResourceType.PROCESSOR_CYCLES
    clock = [1000.0]
    monkeypatch.setattr(_time, "time", lambda: clock[0])
    factory = lambda t, r: make_forecaster({"name": "seasonal_naive", "period": 10})  # noqa: E731
    store = ProfileStore.in_dir(str(tmp_path))
    p = TaskProfiler(factory, store=store)
    p.interval = 1.0
    for i in range(30):  # bursts at phases 0..2 of every 10 ticks
        p.update_prediction("web", cpu, 1000.0 if i % 10 < 3 else 0.0)
        clock[0] += 1.0
        p.flush(clock[0])
    p.checkpoint(clock[0])
    store.close()
    # next tick would be i=30 (a burst); rswap is down for ticks 30..34 and back at i=35
    clock[0] += 5.0
    q = TaskProfiler(factory, store=ProfileStore.in_dir(str(tmp_path)))
    q.interval = 1.0
    q.restore("web")
    ahead = q.get_predicted_needs("web", 10)[cpu].series
    # i=35..44: the burst is at i=40..42, i.e. 5..7 ticks ahead, not at once
    assert [round(v) for v in ahead] == [0, 0, 0, 0, 0, 1000, 1000, 1000, 0, 0]
    # Start-up took 2 ticks more: the first sample (i=37) is learnt at its own phase.
    clock[0] += 3.0
    q.update_prediction("web", cpu, 0.0)
    ahead = q.get_predicted_needs("web", 5)[cpu].series
    assert [round(v) for v in ahead] == [0, 0, 1000, 1000, 1000]  # i=38..42


def test_checkpoints_store_history_once_and_restore_it_exactly():
    from rswap_ebpf.predict.profile import freeze, thaw

    p = profiler(None)
    for i in range(400):
        p.update_prediction("web", CPU, y(i) + i / 7.0)
    prof = p.profiles[("web", CPU)]
    state = prof.__getstate__()
    assert state["history"] == ("forecaster", 400, prof.history.maxlen)  # not a second copy
    back = thaw(freeze(prof))
    assert list(back.history) == list(prof.history)
    assert back.history.maxlen == prof.history.maxlen
    # residuals are kept at half precision in memory too: a restore gives the same values
    assert {n: [list(d) for d in r] for n, r in back.forecaster._resid.items()} == \
        {n: [list(d) for d in r] for n, r in prof.forecaster._resid.items()}
    assert back.forecast(6) == prof.forecast(6)
    # a forecaster that was bridged over a gap has samples the profile's history lacks: kept
    prof.bridge(3)
    assert isinstance(prof.__getstate__()["history"], type(prof.history))
    assert list(thaw(freeze(prof)).history) == list(prof.history)


def test_rollups_are_one_packed_row_per_series_and_day(tmp_path):
    with ProfileStore(str(tmp_path / "p.db"), Retention(days=2, rollup_s=300)) as st:
        p = profiler(st, checkpoint_every=30)
        t0 = 86400.0 * 100 + 3600  # day 100, 01:00
        for i in range(3 * 24 * 12):  # three days of 5-minute ticks
            p.update_prediction("a", CPU, float(i % 288))
            p.flush(t0 + 300.0 * i)
        p.checkpoint(t0 + 300.0 * 864)
        days = [r[0] for r in st.db.execute("SELECT day FROM rollup_day ORDER BY day")]
        assert days == [101, 102, 103]  # day 100 fell out of the 2-day retention
        hist = st.history("a", "cpu")
        assert [h[0] for h in hist] == sorted(h[0] for h in hist)
        assert all(h[3] == 1 and h[1] == h[2] == float(int(((h[0] - t0) / 300) % 288))
                   for h in hist)


def _learnt_db(path):
    with ProfileStore(path) as st:
        p = profiler(st, checkpoint_every=10)
        for i in range(200):
            p.update_prediction("web", CPU, y(i))
            p.flush(5000.0 + i)
        p.checkpoint(6000.0)
        st.vacuum()


@pytest.mark.parametrize("damage", ["truncated", "interior", "header"])
def test_a_damaged_profiles_db_is_moved_aside_and_rebuilt(tmp_path, caplog, damage):
    db = tmp_path / "profiles.db"
    _learnt_db(str(db))
    raw = bytearray(db.read_bytes())
    assert len(raw) >= 4 * 4096
    if damage == "truncated":
        raw = raw[:len(raw) // 2 + 100]
    elif damage == "interior":  # a page in the middle: the header still reads fine
        page = 4096
        mid = (len(raw) // page // 2) * page
        raw[mid:mid + page] = bytes((i * 37) % 251 for i in range(page))
    else:
        raw[:100] = b"x" * 100
    db.write_bytes(bytes(raw))
    with caplog.at_level("WARNING"):
        st = ProfileStore(str(db))
    with st:
        assert st.moved_aside and os.path.basename(st.moved_aside).startswith(
            "profiles.db.corrupt-")
        assert os.path.exists(st.moved_aside)
        assert st.identities() == []  # rebuilt empty, and usable
        p = profiler(st)
        p.update_prediction("web", CPU, 1.0)
        p.flush(7000.0)
        assert st.identities() == ["web"]
    assert st.moved_aside in caplog.text and "damaged" in caplog.text
    with ProfileStore(str(db)) as again:  # the rebuilt one is sound: nothing moved this time
        assert again.moved_aside is None and again.identities() == ["web"]


def test_a_sound_profiles_db_is_not_moved(tmp_path):
    db = str(tmp_path / "profiles.db")
    _learnt_db(db)
    with ProfileStore(db) as st:
        assert st.moved_aside is None and st.identities() == ["web"]
    assert [f for f in os.listdir(tmp_path) if "corrupt" in f] == []
