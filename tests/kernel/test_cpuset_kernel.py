"""Core isolation on the real kernel: a batch task's cpuset shrinks while the critical tier's
allocation says a burst is coming, grows back after the hold, and the journal restores it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest

from rswap_ebpf.host.cgroup import BATCH_SUBTREE
from rswap_ebpf.host.cgroup import CgroupManager, FileApplier, detect_mounts
from rswap_ebpf.host.cpu.cpuset import (CpusetIsolator, CriticalIsolation, IsolationPolicy,
                                       cpuset_hierarchy, format_cpulist, parse_cpulist)
from rswap_ebpf.host.journal import Journal, remove_cgroup_dir, write_file

from ..conftest import rswap_cmd, run_rswap
from .helpers import scratch_cgroup

SLEEP = ["sleep", "60"]


def _affinity(pid: int) -> frozenset[int]:
    return frozenset(os.sched_getaffinity(pid))


def _cpuset_rel(pid: int) -> str:
    """``pid``'s cpuset cgroup: the v1 cpuset line, else (cgroup v2) the unified one."""
    unified = None
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            hid, ctrls, rel = line.rstrip("\n").split(":", 2)
            if "cpuset" in ctrls.split(","):
                return rel
            if hid == "0" and ctrls == "":
                unified = rel
    if unified is None:
        raise AssertionError(f"pid {pid} has no cpuset line")
    return unified


def _raw(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture
def cpuset_root():
    try:
        version, root = cpuset_hierarchy(detect_mounts())
    except Exception as err:  # FeatureMissing: said, not skipped silently
        pytest.fail(f"this host has no cpuset controller: {err}")
    allowed = parse_cpulist(_raw(os.path.join(root, "cpuset.effective_cpus" if version == "v1"
                                              else "cpuset.cpus.effective")).decode())
    if len(allowed) < 2:
        pytest.skip("one CPU: there is no core to isolate")
    return version, root, allowed


@contextmanager
def _procs_in(dirs: list[str], n: int = 1):
    """``n`` sleeping processes placed in ``dirs`` before they run; killed afterwards."""
    files = [os.path.join(d, "cgroup.procs") for d in dirs]

    def enter():
        for p in files:
            with open(p, "w") as f:
                f.write(str(os.getpid()))

    procs = [subprocess.Popen(SLEEP, preexec_fn=enter) for _ in range(n)]
    try:
        yield procs
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait()


def test_batch_cpuset_shrinks_during_a_burst_and_the_journal_restores_it(
        tmp_path, unique_name, cpuset_root):
    version, root, allowed = cpuset_root
    journal = Journal(str(tmp_path / "journal.jsonl"))
    mounts = detect_mounts()
    cgm = CgroupManager(journal, mounts)
    cg = cgm.resolve(f"batch-{unique_name}", None)
    iso = CriticalIsolation(CpusetIsolator(mounts, journal, FileApplier(journal), False,
                                           cgm.enable_controllers),
                            IsolationPolicy(above_millicores=250, hold_ticks=1, deadband=0.1))
    keep = frozenset(sorted(allowed)[:-1])
    # v1: rswap makes the task a cpuset directory of its own; v2: the task's cgroup has one
    own = os.path.join(root, "rswap", cg.name)
    v1 = version == "v1"
    try:
        cgm.create(cg)
        with _procs_in(list(cg.dirs.values())) as (first,):
            home = _cpuset_rel(first.pid)
            before = _affinity(first.pid)
            assert before == allowed
            # no burst forecast: nothing is made or moved
            assert iso.settle(100, {cg.name: cg}).cores == 0
            assert _cpuset_rel(first.pid) == home
            if v1:
                assert not os.path.exists(own)
            # a burst forecast: batch leaves the highest core
            state = iso.settle(600, {cg.name: cg})
            assert state.cores == 1 and state.lower_cpus == keep
            assert _affinity(first.pid) == keep
            if v1:
                assert _cpuset_rel(first.pid) == f"/rswap/{cg.name}"
            else:
                assert _cpuset_rel(first.pid) == home  # written in place
            assert parse_cpulist(_raw(os.path.join(own, "cpuset.cpus")).decode()) == keep
            # a process the task starts during the burst is moved too
            with _procs_in(list(cg.dirs.values())) as (late,):
                assert iso.settle(600, {cg.name: cg}).cores == 1
                assert _affinity(late.pid) == keep
                # the forecast falls: one tick held, then every core back
                assert iso.settle(100, {cg.name: cg}).cores == 1
                assert _affinity(first.pid) == keep
                assert iso.settle(100, {cg.name: cg}).cores == 0
                assert _affinity(first.pid) == allowed and _affinity(late.pid) == allowed
                # shrunk again, then rswap stops mid-burst: the journal puts everything back
                assert iso.settle(900, {cg.name: cg}).cores == 1
                assert _affinity(late.pid) == keep
                report = journal.restore()
                assert not report.failed, report.failed
                for p in (first, late):
                    assert _affinity(p.pid) == before
                    if v1:  # (v2: the task's own cgroup is gone, its processes moved up)
                        assert _cpuset_rel(p.pid) == home
                assert not os.path.exists(own)
    finally:
        for d in list(cg.dirs.values()) + [own]:
            if os.path.isdir(d):
                remove_cgroup_dir(d)
        journal.restore()


def test_adopted_cpuset_is_shrunk_in_place_and_restored_byte_for_byte(
        tmp_path, unique_name, cpuset_root):
    version, root, allowed = cpuset_root
    if version == "v2":
        _adopted_v2_cpuset_is_shrunk_in_place_and_restored(tmp_path, unique_name, root, allowed)
        return
    name = f"rswap-test-{unique_name}"
    mine = os.path.join(root, name)
    with scratch_cgroup(name) as dirs:
        try:
            os.mkdir(mine)
            for f in ("cpuset.cpus", "cpuset.mems"):
                write_file(os.path.join(mine, f), _raw(os.path.join(root, f)).decode().strip())
            original = _raw(os.path.join(mine, "cpuset.cpus"))
            journal = Journal(str(tmp_path / "journal.jsonl"))
            mounts = detect_mounts()
            cgm = CgroupManager(journal, mounts)
            cg = cgm.resolve("etl", name)
            iso = CriticalIsolation(CpusetIsolator(mounts, journal, FileApplier(journal)),
                                    IsolationPolicy(above_millicores=250, hold_ticks=0))
            with _procs_in(list(dirs.values()) + [mine]) as (p,):
                state = iso.settle(1200, {"etl": cg})
                assert state.cores == 1
                assert _affinity(p.pid) == state.lower_cpus
                assert _cpuset_rel(p.pid) == f"/{name}"  # used in place, not moved
                assert not os.path.exists(os.path.join(root, "rswap", "etl"))
                assert not journal.restore().failed
                assert _raw(os.path.join(mine, "cpuset.cpus")) == original
                assert _affinity(p.pid) == allowed
        finally:
            if os.path.isdir(mine):
                remove_cgroup_dir(mine)


def _adopted_v2_cpuset_is_shrunk_in_place_and_restored(tmp_path, unique_name, root, allowed):
    """cgroup v2: an operator's cgroup under a parent that enables cpuset, with its own
    ``cpuset.cpus``, is written in place and given back byte for byte."""
    name = f"rswap-test-{unique_name}"
    ctl = os.path.join(root, "cgroup.subtree_control")
    enabled = "cpuset" not in _raw(ctl).decode().split()
    if enabled:
        write_file(ctl, "+cpuset")
    try:
        with scratch_cgroup(name) as dirs:
            mine = dirs["unified"]
            write_file(os.path.join(mine, "cpuset.cpus"), format_cpulist(allowed))
            original = _raw(os.path.join(mine, "cpuset.cpus"))
            journal = Journal(str(tmp_path / "journal.jsonl"))
            mounts = detect_mounts()
            cg = CgroupManager(journal, mounts).resolve("etl", name)
            iso = CriticalIsolation(CpusetIsolator(mounts, journal, FileApplier(journal)),
                                    IsolationPolicy(above_millicores=250, hold_ticks=0))
            with _procs_in([mine]) as (p,):
                state = iso.settle(1200, {"etl": cg})
                assert state.cores == 1
                assert parse_cpulist(_raw(os.path.join(mine, "cpuset.cpus")).decode()) \
                    == state.lower_cpus
                assert _affinity(p.pid) == state.lower_cpus
                assert _cpuset_rel(p.pid) == f"/{name}"  # used in place, not moved
                assert not journal.restore().failed
                assert _raw(os.path.join(mine, "cpuset.cpus")) == original
                assert _affinity(p.pid) == allowed
    finally:
        if enabled:
            try:
                write_file(ctl, "-cpuset")
            except OSError:
                pass  # something else below the root uses it now


#: A critical task that burns a core for 0.6 s every 1.2 s (4 ticks of 0.3 s): a period the CPU
#: driver's protection (host.cpu.protect) finds in its use, so it isolates ahead of each burst.
BURNER = ("import time\nend = time.monotonic() + 60\nwhile time.monotonic() < end:\n"
          "    t = time.monotonic() + 0.6\n    while time.monotonic() < t: pass\n"
          "    time.sleep(0.6)")

CONFIG = """
[daemon]
interval = 0.3
window = 1

[resources.cpu]
total = 2000
critical_isolate = true

[[task]]
name = "{crit}"
priority = "critical"
command = ["{python}", "-c", {burner}]
forecaster = "last_value"
cpu = {{ min = 100 }}

[[task]]
name = "{batch}"
priority = "batch"
command = ["sleep", "60"]
forecaster = "last_value"
cpu = {{ min = 100 }}
"""


def test_rswap_run_with_critical_isolate_moves_batch_off_a_core_and_restores(
        tmp_path, rswap_env, unique_name, cpuset_root):
    """End to end: the critical task bursts to a core with a period, so the daemon keeps the
    batch task off one core ahead of its bursts, and leaves no cpuset behind."""
    version, root, allowed = cpuset_root
    crit, batch = f"crit-{unique_name}", f"batch-{unique_name}"
    cfg = tmp_path / "rswap.toml"
    cfg.write_text(CONFIG.format(crit=crit, batch=batch, python=sys.executable,
                                 burner=json.dumps(BURNER)))
    pin = f"/sys/fs/bpf/test-{unique_name}"
    env = {**rswap_env, "RSWAP_PIN_DIR": pin}
    full_env = {**os.environ, **env}
    proc = subprocess.Popen(rswap_cmd() + ["run", "--config", str(cfg), "--count", "200"],
                            env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    procs = os.path.join(detect_mounts().unified, BATCH_SUBTREE, batch, "cgroup.procs")
    seen = None
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                pids = [int(x) for x in _raw(procs).split()]
            except OSError:
                pids = []
            if pids and _affinity(pids[0]) != allowed:
                seen = (pids[0], _affinity(pids[0]))
                break
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert seen is not None, f"batch never left a core; rswap said:\n{out[-3000:]}"
    assert seen[1] == frozenset(sorted(allowed)[:-1])
    assert "isolation: 1 core(s) kept for the critical tier" in out
    assert proc.returncode == 0, out[-3000:]
    assert not os.path.exists(os.path.join(root, BATCH_SUBTREE, batch))
    assert not os.path.exists(pin)
    assert run_rswap("restore", env=env).returncode == 0
