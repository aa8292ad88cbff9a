"""`rswap record` on the real kernel: BPF sensing into a CSV trace, profiles persisted to SQLite.

The daemon runs as a dry run (nothing capped); the task is a real busy loop in a cgroup rswap
creates and removes.  A second run of the same task name starts from the first run's profile.
"""
from __future__ import annotations

import os
import shutil
import sqlite3

from tests.conftest import run_rswap
from rswap_ebpf.host.cgroup import detect_mounts
from rswap_ebpf.offline.trace import read_trace


def _config(tmp_path, name):
    conf = tmp_path / "rec.toml"
    conf.write_text(f"""
[daemon]
interval = 0.5
checkpoint_every = 2
[[task]]
name = "{name}"
command = ["{{python}}", "-m", "rswap_ebpf.demo", "spin", "--workers", "1", "--seconds", "30"]
""")
    return str(conf)


def _no_cgroup_left(name):
    mounts = detect_mounts()
    for path in getattr(mounts, "__dict__", {}).values():
        if isinstance(path, str) and os.path.isdir(path):
            assert not os.path.exists(os.path.join(path, name)), f"cgroup {name} left in {path}"


def _history(db, task) -> list[float]:
    """The samples of ``task``'s stored profile, as the next run restores them."""
    from rswap_ebpf.predict.profile import TaskProfiler
    from rswap_ebpf.predict.store import ProfileStore

    with ProfileStore(db) as st:
        p = TaskProfiler(store=st)
        p.restore(task)
        (prof,) = [v for (t, _), v in p.profiles.items() if t == task]
        return list(prof.history)


def test_record_writes_a_trace_and_persists_profiles(tmp_path, rswap_env, unique_name):
    pin = f"/sys/fs/bpf/{unique_name}"
    env = {**rswap_env, "RSWAP_PIN_DIR": pin}
    out = tmp_path / "trace.csv"
    try:
        r = run_rswap("record", "--config", _config(tmp_path, unique_name), "--output", str(out),
                      "--count", "6", env=env, timeout=90)
        assert r.returncode == 0, r.stderr
        tr = read_trace(str(out))
        assert tr.tasks == [unique_name]
        assert len(tr.times) == 6
        used = tr.demand[(unique_name, tr.resources[0])]
        assert max(used) > 300  # a busy loop shows up as a good part of a CPU (loaded host)
        db = os.path.join(rswap_env["state"], "profiles.db")
        with sqlite3.connect(db) as c:
            states = c.execute("SELECT s.identity, t.model FROM state t JOIN series s "
                               "ON s.id = t.series").fetchall()
        assert (unique_name, ) == states[0][:1]
        first = _history(db, unique_name)
        # The second run starts where the first ended: the first run's samples, then 3 ticks'
        # more.  Profiles learn one sample per wall-clock slot (a late tick covers several: 6
        # ticks were 6-8 slots, 9 were 14, in the emulated guest), so count slots, not ticks.
        assert len(first) >= 6
        r = run_rswap("record", "--config", _config(tmp_path, unique_name), "--output",
                      str(tmp_path / "t2.csv"), "--count", "3", env=env, timeout=90)
        assert r.returncode == 0, r.stderr
        second = _history(db, unique_name)
        assert second[:len(first)] == first
        t2 = read_trace(str(tmp_path / "t2.csv")).times
        assert len(t2) == 3
        # at least a sample a tick, at most one per slot of the 0.5 s interval the ticks spanned
        assert 3 <= len(second) - len(first) <= 3 + round((t2[-1] - t2[0]) / 0.5), (first, second, t2)
        _no_cgroup_left(unique_name)
    finally:
        shutil.rmtree(pin, ignore_errors=True)
