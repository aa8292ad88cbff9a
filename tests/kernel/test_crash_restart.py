"""One daemon at a time, restarts after a crash, and profiles that survive the crash.

Real ``rswap run`` subprocesses on the real kernel (cgroups, BPF), private state/run/pin dirs.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from rswap_ebpf.predict.profile import TaskProfiler
from rswap_ebpf.predict.store import ProfileStore
from rswap_ebpf.model.resources import ResourceType
from tests.conftest import rswap_cmd, run_rswap
from tests.kernel.helpers import scratch_cgroup, set_cpu_limit

CPU = ResourceType.PROCESSOR_CYCLES


@pytest.fixture
def env(rswap_env, unique_name, monkeypatch):
    pin_dir = f"/sys/fs/bpf/rswap-test-{unique_name}"
    monkeypatch.setenv("RSWAP_PIN_DIR", pin_dir)
    e = {**rswap_env, "RSWAP_PIN_DIR": pin_dir}
    yield e
    run_rswap("restore", env=e, timeout=60)
    assert not os.path.exists(pin_dir)


@pytest.fixture
def adopted(unique_name):
    """An existing cgroup with a process and a known quota: rswap's changes show there."""
    with scratch_cgroup(f"rs-{unique_name}") as dirs:
        quota, original = next(iter(set_cpu_limit(dirs, 70000, 1024).items()))
        procs = [os.path.join(d, "cgroup.procs") for d in dirs.values()]

        def enter():
            for p in procs:
                with open(p, "w") as fh:
                    fh.write(str(os.getpid()))

        p = subprocess.Popen(["sleep", "120"], preexec_fn=enter)
        try:
            yield f"rs-{unique_name}", quota, original
        finally:
            p.kill()
            p.wait()


def config(tmp_path, cgroup: str, name: str) -> str:
    path = tmp_path / "restart.toml"
    path.write_text(f"""
[daemon]
interval = 0.1
checkpoint_every = 7
[resources.cpu]
total = 2000
[[task]]
name = "{name}"
cgroup = "{cgroup}"
cpu = {{ min = 300 }}
""")
    return str(path)


def start(cfg: str, env: dict, count: int = 600, extra: list[str] = ()) -> subprocess.Popen:
    return subprocess.Popen(rswap_cmd() + ["run", "--config", cfg, "--count", str(count), *extra],
                            env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_tick(env: dict, tick: int, p: subprocess.Popen, timeout: float = 60) -> dict:
    path = os.path.join(env["RSWAP_RUN_DIR"], "status.json")
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert p.poll() is None, p.communicate()
        try:
            with open(path) as f:
                st = json.load(f)
            if st["tick"] >= tick:
                return st
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"no tick {tick} in {timeout}s")


def read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def test_second_daemon_refused_while_one_runs_and_restart_after_kill(tmp_path, env, adopted,
                                                                     unique_name):
    cgroup, quota, original = adopted
    cfg = config(tmp_path, cgroup, f"rs-{unique_name}")
    first = start(cfg, env)
    try:
        wait_tick(env, 2, first)
        held = read(quota)
        assert held != original  # the first daemon limits the task
        second = run_rswap("run", "--config", cfg, "--count", "2", env=env, timeout=60)
        assert second.returncode == 1
        assert f"another rswap (pid {first.pid}) is running" in second.stderr
        assert "Traceback" not in second.stderr
        restore = run_rswap("restore", env=env, timeout=60)
        assert restore.returncode == 1 and "is running" in restore.stderr
        assert first.poll() is None  # the refusals did not disturb the first daemon
        # ...nor undo its limit: the first daemon is still the one in charge.
        assert read(quota) != original
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
        first.wait()
    assert read(quota) != original  # a crash leaves its limit (until restore or restart)
    # The stale lock file of the killed daemon blocks nothing; the restart undoes its changes first.
    again = run_rswap("run", "--config", cfg, "--count", "2", env=env, timeout=90)
    assert again.returncode == 0, again.stderr
    assert "a previous run left" in again.stdout and "restoring them first" in again.stdout
    assert read(quota) == original
    assert not os.path.exists(os.path.join(env["RSWAP_STATE_DIR"], "journal.jsonl"))


def test_restart_after_kill_resumes_profiles(tmp_path, env, adopted, unique_name):
    cgroup, _, _ = adopted
    name = f"rs-{unique_name}"
    cfg = config(tmp_path, cgroup, name)
    p = start(cfg, env)
    try:
        st = wait_tick(env, 25, p)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
    ticks_done = st["tick"]  # published after the tick's samples were committed
    db = os.path.join(env["RSWAP_STATE_DIR"], "profiles.db")
    with ProfileStore(db) as store:
        history = store.history(name, CPU.key)
        stored = sum(n for _, _, _, n in history)
        # Every tick up to the last one published is there: at most the tick in flight is lost.
        assert stored >= ticks_done, (stored, ticks_done)
        prof = TaskProfiler(store=store)
        assert prof.restore(name) == [CPU]
        resumed = prof.profiles[(name, CPU)]
        assert len(resumed.history) >= ticks_done
    # The next run starts from that profile: its first tick already has a forecast error (a
    # cold profile needs two samples for one), and the store keeps growing from where it was.
    hist_file = tmp_path / "hist.jsonl"
    r = run_rswap("run", "--config", cfg, "--count", "3", "--history", str(hist_file), env=env,
                  timeout=90)
    assert r.returncode == 0, r.stderr
    first_tick = json.loads(hist_file.read_text().splitlines()[0])
    assert first_tick["tick"] == 1
    assert first_tick["tasks"][name]["resources"]["cpu"]["mae"] is not None
    with ProfileStore(db) as store:
        assert sum(n for _, _, _, n in store.history(name, CPU.key)) >= stored + 3
