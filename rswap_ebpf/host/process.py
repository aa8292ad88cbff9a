"""The processes rswap starts for its tasks: tied to the daemon, journalled, stopped on restore.

A spawned command enters its task's cgroups and a session of its own before ``exec`` (no instant
outside), and asks the kernel for SIGKILL when the thread that forked it dies
(``PR_SET_PDEATHSIG``), so a ``kill -9`` of ``rswap run`` takes the workloads with it.  Each
spawn is journalled with its pid and start time (``/proc/PID/stat`` field 22, clock ticks since
boot), and ``rswap restore`` stops what survived -- the session's other members too (a shell's
children do not get the parent-death signal) -- without mistaking a reused pid for it.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from rswap_ebpf import paths
from rswap_ebpf.errors import RswapError
from rswap_ebpf.host.journal import Journal, register_undo

log = logging.getLogger(__name__)

#: the journal's ``custom`` kind of a spawned task's entry
SPAWN_KIND = "spawn"
_PR_SET_PDEATHSIG = 1
_PF_KTHREAD = 0x00200000


class CommandNotFound(RswapError):
    """A task's command cannot be run; exits as a shell does (127, or 126 when not executable)."""

    def __init__(self, message: str, exit_status: int = 127):
        self.exit_status = exit_status
        super().__init__(message)


@dataclass(frozen=True)
class ProcStat:
    """The /proc/PID/stat fields rswap needs."""

    pid: int
    sid: int
    flags: int
    start_ticks: int


def proc_stat(pid: int) -> ProcStat | None:
    """``pid``'s stat, or None when there is no such process."""
    try:
        with open(os.path.join(paths.root("PROCFS_ROOT"), str(pid), "stat")) as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError as err:
        if err.errno == errno.ESRCH:
            return None
        raise
    # comm (field 2) may hold spaces and parentheses: the fields after it follow the last ')'
    rest = text[text.rindex(")") + 2:].split()
    # rest[0] is field 3 (state): field N is rest[N - 3]
    return ProcStat(pid, int(rest[6 - 3]), int(rest[9 - 3]), int(rest[22 - 3]))


def is_kernel_thread(pid: int) -> bool:
    st = proc_stat(pid)
    return st is not None and bool(st.flags & _PF_KTHREAD)


def _libc_prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


class Spawner:
    """Starts task commands from one thread that lives as long as the daemon.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child exits, not the process:
    a command started from the control socket's thread would be killed when that thread ends.
    One long-lived worker forks them all; it ends in :meth:`close`, after the tasks are stopped.
    """

    def __init__(self, journal: Journal | None, keep: bool = False):
        self.journal = journal
        #: ``daemon.kill_mode = "keep"``: commands outlive the daemon (no parent-death signal, no
        #: journal entry: restore leaves them running), as systemd's KillMode=none
        self.keep = keep
        self._pool: ThreadPoolExecutor | None = None

    def spawn(self, task: str, command: Sequence[str], cgroup_procs: Sequence[str],
              env: Mapping[str, str] | None = None) -> subprocess.Popen:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="rswap-spawn")
        proc = self._pool.submit(self._start, task, tuple(command), tuple(cgroup_procs),
                                 dict(env or {})).result()
        if self.journal is not None and not self.keep:
            st = proc_stat(proc.pid)
            self.journal.record_custom(SPAWN_KIND, {"task": task, "pid": proc.pid,
                                                    "start": st.start_ticks if st else None})
        return proc

    def _start(self, task: str, command: tuple[str, ...], procs: tuple[str, ...],
               env: dict[str, str]) -> subprocess.Popen:
        prctl = None if self.keep else _libc_prctl()
        parent = os.getpid()

        def enter() -> None:  # in the child, before exec
            me = str(os.getpid())
            for p in procs:
                with open(p, "w") as f:
                    f.write(me)
            os.setsid()
            if prctl is not None:
                prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
                if os.getppid() != parent:  # the daemon died before the call: follow it
                    os._exit(137)

        try:
            return subprocess.Popen(list(command), preexec_fn=enter,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, close_fds=True,
                                    env={**os.environ, **env} if env else None)
        except FileNotFoundError as err:
            raise CommandNotFound(f"task {task}: cannot start {command[0]!r}: no such command "
                                  "(give a path, or fix PATH)") from err
        except PermissionError as err:
            raise CommandNotFound(f"task {task}: cannot start {command[0]!r}: not executable",
                                  126) from err
        except (OSError, subprocess.SubprocessError) as err:
            raise RswapError(f"task {task}: cannot start {command[0]!r}: {err}") from err

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def signal_session(pid: int, sig: int) -> None:
    """Send ``sig`` to the process group a spawned command leads (it called setsid)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop(proc: subprocess.Popen, term_s: float = 3.0, kill_s: float = 2.0) -> int | None:
    """SIGTERM ``proc``'s process group, SIGKILL it after ``term_s``; its exit status, or None
    when it outlived both (reported by the caller, never raised).  Members of the group still
    there when it has exited (a parent that does not wait for its workers) get until
    ``term_s`` too, then SIGKILL."""
    deadline = time.monotonic() + term_s
    if proc.poll() is None:
        signal_session(proc.pid, signal.SIGTERM)
    code = None
    for sig, wait_s in ((None, term_s), (signal.SIGKILL, kill_s)):
        if sig is not None:
            signal_session(proc.pid, sig)
        try:
            code = proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if _group_alive(proc.pid):
        signal_session(proc.pid, signal.SIGKILL)
    return code


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _session_members(sid: int, since_ticks: int) -> list[int]:
    out = []
    root = paths.root("PROCFS_ROOT")
    for name in os.listdir(root):
        if not name.isdigit():
            continue
        st = proc_stat(int(name))
        if st is not None and st.sid == sid and st.start_ticks >= since_ticks:
            out.append(st.pid)
    return out


def _undo_spawn(data: dict) -> None:
    """Restore: SIGKILL a spawned command that outlived its daemon, and its session.

    Only when the pid's start time is the one journalled (the pid was not reused), or, once the
    leader is gone, members of its session that started after it: the kernel does not hand out
    a pid again while a session of that id has members.
    """
    pid, start = data.get("pid"), data.get("start")
    if not isinstance(pid, int) or pid <= 1 or not isinstance(start, int):
        log.warning("journal: spawn entry %r names no process; retired", data)
        return
    leader = proc_stat(pid)
    if leader is not None and leader.start_ticks != start:
        return  # the pid now belongs to another process
    victims = _session_members(pid, start)
    for v in victims:
        try:
            os.kill(v, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if victims:
        log.warning("restore: stopped %d process(es) of task %s that outlived rswap",
                    len(victims), data.get("task"))
    deadline = time.monotonic() + 2
    while victims and time.monotonic() < deadline:
        victims = [v for v in victims if proc_stat(v) is not None and not _zombie(v)]
        time.sleep(0.02)


def _zombie(pid: int) -> bool:
    try:
        with open(os.path.join(paths.root("PROCFS_ROOT"), str(pid), "stat")) as f:
            text = f.read()
    except OSError:
        return True
    return text[text.rindex(")") + 2:].startswith("Z")


register_undo(SPAWN_KIND, _undo_spawn)
