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
        # the second run starts where the first ended: 6 samples, then 3 more
        r = run_rswap("record", "--config", _config(tmp_path, unique_name), "--output",
                      str(tmp_path / "t2.csv"), "--count", "3", env=env, timeout=90)
        assert r.returncode == 0, r.stderr
        from rswap_ebpf.predict.profile import TaskProfiler
        from rswap_ebpf.predict.store import ProfileStore

        with ProfileStore(db) as st:
            p = TaskProfiler(store=st)
            p.restore(unique_name)
            (prof,) = [v for (t, _), v in p.profiles.items() if t == unique_name]
            assert len(prof.history) == 9
        _no_cgroup_left(unique_name)
    finally:
        shutil.rmtree(pin, ignore_errors=True)
