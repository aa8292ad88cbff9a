"""What rswap run starts ends with it, on the real kernel (issue #22): a SIGHUP restores like
SIGTERM; a task's cgroup removed under the daemon is let go, not fatal; a kernel thread in
``pids`` is refused before anything is journalled, and an old journal entry that moved one is
retired; a missing command exits 127 with the host restored."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from rswap_ebpf.host.cgroup import detect_mounts
from rswap_ebpf.host.process import is_kernel_thread

from ..conftest import rswap_cmd, run_rswap
from .helpers import TIME_SCALE, owned_dirs

SPIN = ("import time\\nend = time.monotonic() + 120\\nwhile time.monotonic() < end:\\n"
        "    t = time.monotonic()\\n    while time.monotonic() < t + 0.02: pass\\n"
        "    time.sleep(0.08)")

CONFIG = """
[daemon]
interval = 0.2
window = 2
[resources.cpu]
total = 1000
{tasks}
"""

TASK = """
[[task]]
name = "{name}"
command = ["{{python}}", "-c", "{spin}", "{marker}"]
cpu = {{ min = 100 }}
"""


def marked(marker: str) -> list[int]:
    """Live (not zombie) processes carrying ``marker`` in their argv."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if marker.encode() in argv:
            out.append(int(pid))
    return out


def kill_marked(marker: str) -> None:
    for pid in marked(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout * TIME_SCALE
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture
def setup(tmp_path, rswap_env, unique_name):
    marker = f"{random.randint(10**6, 10**7 - 1)}"
    env = {**rswap_env, "RSWAP_PIN_DIR": f"/sys/fs/bpf/test-{unique_name}"}
    names = [f"a-{unique_name}", f"b-{unique_name}"]
    cfg = tmp_path / "rswap.toml"
    cfg.write_text(CONFIG.format(tasks="".join(TASK.format(name=n, spin=SPIN, marker=marker)
                                               for n in names)))
    journal = os.path.join(rswap_env["state"], "journal.jsonl")
    status = os.path.join(rswap_env["run"], "status.json")
    yield {"env": env, "cfg": str(cfg), "marker": marker, "names": names, "journal": journal,
           "status": status, "tmp": tmp_path}
    kill_marked(marker)
    run_rswap("restore", env=env, timeout=60)


def start(s, count=2000) -> subprocess.Popen:
    return subprocess.Popen(rswap_cmd() + ["run", "--config", s["cfg"], "--count", str(count)],
                            env={**os.environ, **s["env"]}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def ticked(s, at_least: int):
    def check():
        try:
            with open(s["status"]) as f:
                return json.load(f)["tick"] >= at_least
        except (OSError, ValueError, KeyError):
            return False
    return check


def task_dirs(name: str) -> list[str]:
    return owned_dirs(name)


def test_sighup_stops_and_restores_like_sigterm(setup):
    p = start(setup)
    try:
        wait_for(ticked(setup, 2), 60, "two ticks")
        assert len(marked(setup["marker"])) == 2
        p.send_signal(signal.SIGHUP)
        out, err = p.communicate(timeout=30 * TIME_SCALE)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert "stopped; host restored" in out
    assert not os.path.exists(setup["journal"])
    assert marked(setup["marker"]) == []
    assert not any(os.path.exists(d) for n in setup["names"] for d in task_dirs(n))


def test_no_spawned_process_outlives_a_sigkilled_daemon(setup):
    p = start(setup)
    try:
        wait_for(ticked(setup, 2), 60, "two ticks")
        assert len(marked(setup["marker"])) == 2
        with open(setup["journal"]) as f:
            spawns = [json.loads(line)["data"] for line in f
                      if '"kind": "spawn"' in line]
        assert sorted(s["pid"] for s in spawns) == sorted(marked(setup["marker"]))
        p.kill()
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    # the parent-death signal alone: no restore yet
    wait_for(lambda: not marked(setup["marker"]), 5, "the spawned tasks to die with rswap")
    r = run_rswap("restore", env=setup["env"], timeout=60)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(setup["journal"])


def test_restore_stops_what_survived_a_sigkilled_daemon(setup):
    """A workload that escaped the parent-death signal (a shell's child does not get it) is
    stopped by rswap restore, found by the session the journal names."""
    grandchild = ("import os, sys, time\\nif os.fork() == 0:\\n    time.sleep(120)\\n"
                  "time.sleep(120)")
    cfg = CONFIG.format(tasks=f"""
[[task]]
name = "{setup['names'][0]}"
command = ["{{python}}", "-c", "{grandchild}", "{setup['marker']}"]
cpu = {{ min = 100 }}
""")
    with open(setup["cfg"], "w") as f:
        f.write(cfg)
    p = start(setup)
    try:
        wait_for(lambda: len(marked(setup["marker"])) == 2, 60, "the task and its child")
        wait_for(ticked(setup, 1), 60, "a tick")
        p.kill()
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    left = wait_for(lambda: len(marked(setup["marker"])) == 1 and marked(setup["marker"]), 5,
                    "the leader to die with rswap")
    assert len(left) == 1  # the forked child lives on, unmanaged...
    r = run_rswap("restore", env=setup["env"], timeout=60)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: not marked(setup["marker"]), 5, "restore to stop the survivor")  # ...until now


def test_a_task_cgroup_removed_under_the_daemon_is_let_go(setup):
    a, b = setup["names"]
    p = start(setup)
    try:
        wait_for(ticked(setup, 2), 60, "two ticks")
        mounts = detect_mounts()
        for d in task_dirs(a):
            if not os.path.isdir(d):
                continue
            root = os.path.dirname(os.path.dirname(d))
            with open(os.path.join(d, "cgroup.procs")) as f:
                pids = f.read().split()
            for pid in pids:  # moved out by hand, then the directory removed
                with open(os.path.join(root, "cgroup.procs"), "w") as f:
                    f.write(pid)
            os.rmdir(d)
        assert mounts
        with open(setup["status"]) as f:
            now = json.load(f)["tick"]
        wait_for(ticked(setup, now + 5), 60, "five more ticks")
        assert p.poll() is None
        with open(setup["status"]) as f:
            st = json.load(f)
        assert a not in st["tasks"] and b in st["tasks"]
        p.terminate()
        out, err = p.communicate(timeout=30 * TIME_SCALE)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert f"task {a} vanished" in out and "stopped; host restored" in out
    assert "Traceback" not in err
    assert marked(setup["marker"]) == []
    assert not os.path.exists(setup["journal"])


def test_a_kernel_thread_in_pids_is_refused_and_an_old_entry_for_one_retired(setup):
    if not is_kernel_thread(2):
        pytest.skip("pid 2 is not a kernel thread here")
    with open(setup["cfg"], "w") as f:
        f.write(CONFIG.format(tasks='[[task]]\nname = "k"\npids = [2]\n'))
    r = run_rswap("run", "--config", setup["cfg"], "--count", "1", env=setup["env"], timeout=60)
    assert r.returncode == 2 and "pid 2 is a kernel thread" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not os.path.exists(setup["journal"])
    # a journal an older rswap left after trying: restore retires the entry, no lock-out
    mounts = detect_mounts()
    procs = os.path.join(next(iter(mounts.hierarchies.values())), "cgroup.procs")
    os.makedirs(os.path.dirname(setup["journal"]), exist_ok=True)
    with open(setup["journal"], "w") as f:
        f.write(json.dumps({"op": "move", "pid": 2, "procs": procs}) + "\n")
    r = run_rswap("restore", env=setup["env"], timeout=60)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(setup["journal"])


def test_a_missing_command_exits_127_with_the_host_restored(setup):
    with open(setup["cfg"], "w") as f:
        f.write(CONFIG.format(tasks='[[task]]\nname = "m"\n'
                              'command = ["/nonexistent/rswap-test-command"]\n'))
    r = run_rswap("run", "--config", setup["cfg"], "--count", "1", env=setup["env"], timeout=60)
    assert r.returncode == 127, (r.stdout, r.stderr)
    assert "no such command" in r.stderr
    assert not os.path.exists(setup["journal"])
    assert "host restored" not in r.stdout or "could not" not in r.stdout
