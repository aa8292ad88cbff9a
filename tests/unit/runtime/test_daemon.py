"""The daemon around the pipeline, on a fake host: a temporary cgroup tree (the cgroup2 file
layout: a directory per cgroup with ``cgroup.procs``) and a fake CPU driver (host/driver.py's
Reads + Enforces).  One start path, one stop path run once, the locks, the lifecycle's errors."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import pytest

from rswap_ebpf.errors import AlreadyRunning, ConfigError, RswapError
from rswap_ebpf.host import process as procmod
from rswap_ebpf.host.cgroup import CgroupMounts
from rswap_ebpf.host.driver import Driver, Enforces, Reads
from rswap_ebpf.host.journal import Journal, RestoreReport
from rswap_ebpf.model.resources import ResourceType
from rswap_ebpf.runtime import config
from rswap_ebpf.runtime.daemon import Daemon, Hook
from rswap_ebpf.runtime.lock import Lock

CPU = ResourceType.PROCESSOR_CYCLES

CONFIG = """
[daemon]
interval = 0.05
window = 2
[resources.cpu]
total = 2000
[[task]]
name = "web"
priority = "critical"
cgroup = "web"
forecaster = "last_value"
cpu = { min = 100 }
"""

SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]


class FakeCpu(Driver, Reads, Enforces):
    resource = CPU

    def __init__(self, fail_at: int | None = None):
        self.fail_at = fail_at
        self.ticks = self.opens = self.closes = 0
        self.applied: list[tuple[str, int]] = []

    def total(self):
        return 2000

    def open(self):
        self.opens += 1

    def close(self):
        self.closes += 1

    def measure(self, tasks):
        self.ticks += 1
        if self.ticks == self.fail_at:
            raise RuntimeError("the driver broke")
        return {n: 300.0 for n in tasks}

    def plan(self, cg, units):
        return []

    def apply(self, cg, units):
        self.applied.append((cg.name, units))
        return []


class Counting(Hook):
    def __init__(self, fail_start=False, on_tick=None):
        self.starts = self.ticks = self.stops = 0
        self.fail_start, self.on_tick = fail_start, on_tick

    def start(self, daemon):
        if self.fail_start:
            raise RswapError("the hook could not start")
        self.starts += 1

    def tick(self, report):
        self.ticks += 1
        if self.on_tick:
            self.on_tick(report)

    def stop(self):
        self.stops += 1


@pytest.fixture
def cgroot(tmp_path, rswap_env):
    root = tmp_path / "cgroup"
    (root / "web").mkdir(parents=True)
    (root / "web" / "cgroup.procs").write_text("")
    return root


def _daemon(cgroot, text=CONFIG, driver=None, hooks=()):
    return Daemon(config.parse(text), drivers=[driver or FakeCpu()],
                  mounts=CgroupMounts("unified", str(cgroot)), out=io.StringIO(), hooks=hooks)


@pytest.mark.parametrize("ending", ["count", "sighup", "sigterm", "tick error", "hook start error"])
def test_stop_runs_once_whatever_ends_the_run(cgroot, ending):
    drv = FakeCpu(fail_at=2 if ending == "tick error" else None)
    send = {"sighup": signal.SIGHUP, "sigterm": signal.SIGTERM}.get(ending)
    first = Counting(on_tick=(lambda r: os.kill(os.getpid(), send)) if send else None)
    hooks = [first] + ([Counting(fail_start=True)] if ending == "hook start error" else [])
    d = _daemon(cgroot, driver=drv, hooks=hooks)
    old = signal.getsignal(signal.SIGHUP)
    if ending in ("tick error", "hook start error"):
        with pytest.raises((RuntimeError, RswapError)):
            d.run(count=5)
    else:
        assert d.run(count=3) == 0
        assert "stopped; host restored" in d.out.getvalue()
    assert first.stops == 1 and drv.closes == 1
    assert first.starts == 1 and drv.opens == 1
    assert d.tick_no == {"count": 3, "sighup": 1, "sigterm": 1, "tick error": 2,
                         "hook start error": 0}[ending]
    assert not Lock.held(d.state_dir) and not d.journal
    assert d.stop() is True and first.stops == 1 and drv.closes == 1  # again: nothing more
    assert signal.getsignal(signal.SIGHUP) == old                      # handlers put back
    with pytest.raises(RswapError, match="already run"):
        d.start()


def test_a_failed_restore_never_says_restored(cgroot, monkeypatch):
    d = _daemon(cgroot)
    d.start()
    monkeypatch.setattr(d.journal, "restore",
                        lambda: RestoreReport(0, 0, ["write '/x': Device or resource busy"]))
    assert d.stop() is False
    out = d.out.getvalue()
    assert "could not restore: write '/x'" in out and "host restored" not in out


def test_run_exits_1_when_the_host_is_not_restored(cgroot, monkeypatch):
    d = _daemon(cgroot)
    real_restore = Journal.restore

    def failing(self):
        real_restore(self)
        return RestoreReport(0, 0, ["move 42: No such file or directory"])

    monkeypatch.setattr(Journal, "restore", failing)
    assert d.run(count=1) == 1
    assert "NOT restored" in d.out.getvalue() and "host restored" not in d.out.getvalue()


def test_a_second_daemon_with_another_run_dir_may_not_share_the_journal(cgroot, tmp_path,
                                                                       monkeypatch):
    first = _daemon(cgroot)
    first.start()
    try:
        first.tick()
        entry = {"task": "gone", "pid": 2**22 + 1, "start": 1}  # a change the first one made
        first.journal.record_custom(procmod.SPAWN_KIND, entry)
        monkeypatch.setenv("RSWAP_RUN_DIR", str(tmp_path / "other-run"))
        second = _daemon(cgroot)
        with pytest.raises(AlreadyRunning, match=str(os.getpid())):
            second.start()
        assert second.stop() is True
        assert Lock.held(first.state_dir)  # the first daemon's lock and journal are untouched
        assert any(e.get("data") == entry for e in first.journal.entries())
    finally:
        first.stop()


def test_a_kernel_thread_in_pids_is_refused_before_anything_is_changed(cgroot):
    if not procmod.is_kernel_thread(2):
        pytest.skip("pid 2 is not a kernel thread here")
    with pytest.raises(ConfigError, match="pid 2 is a kernel thread"):
        config.parse(CONFIG.replace('cgroup = "web"\n', "pids = [2]\n"))
    # ...and where a task comes by another way than the file (task.add builds a TaskConfig)
    d = _daemon(cgroot)
    d.start()
    try:
        tc = config.TaskConfig("k", pids=(2,))
        with pytest.raises(ConfigError, match="pid 2 is a kernel thread"):
            d.add_task(tc)
        assert "k" not in d.tasks
        assert not [e for e in d.journal.entries() if e.get("op") == "move"]
    finally:
        assert d.stop() is True


def test_a_missing_command_exits_as_a_shell_does(cgroot):
    """(On a real cgroup tree the journal is then restored too: tests/kernel/test_lifecycle.)"""
    d = _daemon(cgroot, CONFIG.replace('cgroup = "web"\n',
                                       'command = ["/nonexistent/rswap-test-cmd"]\n'))
    with pytest.raises(procmod.CommandNotFound) as info:
        d.start()
    assert info.value.exit_status == 127 and "no such command" in str(info.value)
    assert not Lock.held(d.state_dir)


def test_kill_mode_is_stop_by_default_and_checked():
    assert config.parse(CONFIG).daemon.kill_mode == "stop"
    assert config.parse("[daemon]\nkill_mode = \"keep\"\n" + CONFIG.split("\n", 2)[2]
                        ).daemon.kill_mode == "keep"
    with pytest.raises(ConfigError, match="daemon.kill_mode"):
        config.parse("[daemon]\nkill_mode = \"mixed\"\n")


COMMAND_TASK = CONFIG.replace('cgroup = "web"\n', f"command = {SLEEP!r}\n".replace("'", '"'))


def test_a_spawned_task_is_journalled_with_its_pid_and_start_time_and_stopped(cgroot):
    d = _daemon(cgroot, COMMAND_TASK)
    d.start()
    try:
        proc = d.tasks["web"].process
        spawns = [e["data"] for e in d.journal.entries()
                  if e.get("op") == "custom" and e.get("kind") == procmod.SPAWN_KIND]
        assert spawns == [{"task": "web", "pid": proc.pid,
                           "start": procmod.proc_stat(proc.pid).start_ticks}]
        assert os.getpgid(proc.pid) == proc.pid  # a session of its own: killed as a group
    finally:
        d.stop()
    assert proc.poll() is not None


def test_kill_mode_keep_leaves_the_command_running_and_unjournalled(cgroot):
    d = _daemon(cgroot, "[daemon]\nkill_mode = \"keep\"\n" + COMMAND_TASK.split("\n", 2)[2])
    d.start()
    proc = d.tasks["web"].process
    try:
        assert not [e for e in d.journal.entries() if e.get("kind") == procmod.SPAWN_KIND]
        d.stop()
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_restore_stops_a_survivor_but_not_a_reused_pid(tmp_path):
    journal = Journal(str(tmp_path / "journal.jsonl"))
    survivor = subprocess.Popen(SLEEP, start_new_session=True)
    stranger = subprocess.Popen(SLEEP, start_new_session=True)
    try:
        start = procmod.proc_stat(survivor.pid).start_ticks
        journal.record_custom(procmod.SPAWN_KIND, {"task": "a", "pid": survivor.pid,
                                                   "start": start})
        # the same pid number reused by another process: its start time differs
        journal.record_custom(procmod.SPAWN_KIND, {"task": "b", "pid": stranger.pid,
                                                   "start": start - 1})
        report = Journal(journal.path).restore()
        assert report.failed == [] and report.restored == 2
        assert survivor.wait(timeout=5) == -signal.SIGKILL
        assert stranger.poll() is None
        assert not os.path.exists(journal.path)  # retired, no lock-out
    finally:
        for p in (survivor, stranger):
            if p.poll() is None:
                p.kill()
            p.wait()


def test_a_task_whose_cgroup_vanishes_is_let_go_and_the_daemon_goes_on(cgroot):
    """An adopted cgroup removed by hand (pids moved out, rmdir): reported, not fatal."""
    d = _daemon(cgroot)
    d.start()
    try:
        d.tick()
        for f in (cgroot / "web").iterdir():
            f.unlink()
        (cgroot / "web").rmdir()
        d.tick()
        assert "web" not in d.tasks
        assert "task web vanished" in d.out.getvalue()
        d.tick()
    finally:
        assert d.stop() is True


def test_a_spawned_task_whose_cgroup_vanishes_is_stopped_without_killing_the_daemon(cgroot):
    """Its process outlives the cgroup (moved out): the stop falls back to its session."""
    d = _daemon(cgroot, COMMAND_TASK)
    d.start()
    try:
        proc = d.tasks["web"].process
        cg_dir = d.tasks["web"].cgroup.dirs["unified"]
        for f in os.listdir(cg_dir):
            os.unlink(os.path.join(cg_dir, f))
        os.rmdir(cg_dir)
        t0 = time.monotonic()
        d.tick()
        assert "web" not in d.tasks and proc.poll() is not None
        assert time.monotonic() - t0 < 10
        d.tick()
    finally:
        assert d.stop() is True


def test_rswap_run_takes_stop_signals_before_it_reads_its_config(monkeypatch):
    """A SIGTERM while ``rswap run`` starts is kept (and answered by a clean stop), not a kill:
    the handlers are in place before the configuration is even read."""
    import importlib

    climain = importlib.import_module("rswap_ebpf.cli.main")  # the module, not cli.main()

    seen = {}

    def load(path):
        os.kill(os.getpid(), signal.SIGTERM)  # default disposition: this process would die
        seen["handler"] = signal.getsignal(signal.SIGTERM)
        raise ConfigError("--config", "stop here")

    old = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(climain.configmod, "load", load)
    assert climain.main(["run", "--config", "x.toml"]) == 2
    assert seen["handler"] not in (signal.SIG_DFL, old)
    assert signal.getsignal(signal.SIGTERM) == old  # put back once run returns


def test_minimums_over_a_total_the_host_reports_are_refused_before_anything_changes(cgroot):
    """With no total in the configuration the pool is what the driver reports, known only at
    start: minimums that cannot all be granted are refused then (#22), and nothing is started."""
    text = CONFIG.replace("[resources.cpu]\ntotal = 2000\n", "").replace(
        "cpu = { min = 100 }", "cpu = { min = 2500 }")
    drv = FakeCpu()
    d = _daemon(cgroot, text, driver=drv)
    with pytest.raises(ConfigError, match="minimums add up to 2500"):
        d.start()
    assert drv.opens == 0 and not d.lock.acquired
