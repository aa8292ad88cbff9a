"""The daemon's lock and the host's undo journal, and restoring what a dead run left.

Two flocks, released by the kernel when the holder dies: ``RUN_DIR/rswap.lock`` (the status file
and the control socket) and ``STATE_DIR/rswap.lock`` (the journal).  A second daemon with another
``RSWAP_RUN_DIR`` but the same state dir is refused, so it never shares -- or restores -- the
journal of a daemon that is still running.
"""
from __future__ import annotations

import fcntl
import os

from rswap_ebpf import paths
from rswap_ebpf.errors import AlreadyRunning
from rswap_ebpf.host import bpf as bpfmod
from rswap_ebpf.host.journal import Journal, RestoreReport

LOCK_FILE = "rswap.lock"
JOURNAL_FILE = "journal.jsonl"


def journal_path(state_dir: str) -> str:
    return os.path.join(state_dir, JOURNAL_FILE)


class Lock:
    """The run dir's lock and the state dir's: one daemon per run dir and per journal."""

    def __init__(self, state_dir: str | None = None) -> None:
        self.path = os.path.join(paths.root("RUN_DIR"), LOCK_FILE)
        self.state_path = os.path.join(state_dir or paths.root("STATE_DIR"), LOCK_FILE)
        self._fds: list[tuple[int, str]] = []

    def acquire(self) -> None:
        try:
            for path, mode in ((self.path, 0o755), (self.state_path, 0o700)):
                self._fds.append((_take(path, mode), path))
        except BaseException:
            self.release()
            raise

    @property
    def acquired(self) -> bool:
        """Whether this object holds the lock now."""
        return bool(self._fds)

    def release(self) -> None:
        while self._fds:
            fd, path = self._fds.pop()
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            os.close(fd)

    @staticmethod
    def held(state_dir: str | None = None) -> bool:
        """Whether a daemon holds the run dir's lock (or, given, ``state_dir``'s)."""
        candidates = [os.path.join(paths.root("RUN_DIR"), LOCK_FILE)]
        if state_dir is not None:
            candidates.append(os.path.join(state_dir, LOCK_FILE))
        return any(_is_held(p) for p in candidates)


def _take(path: str, dir_mode: int) -> int:
    os.makedirs(os.path.dirname(path), mode=dir_mode, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        with open(path) as f:
            holder = f.read().strip() or "?"
        os.close(fd)
        raise AlreadyRunning(f"another rswap (pid {holder}) is running ({path}); stop it first "
                             "(or use rswap status)") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _is_held(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def restore_journal(state_dir: str) -> RestoreReport:
    return Journal(journal_path(state_dir)).restore()


def restore_host(state_dir: str) -> tuple[int, list[str], int]:
    """Undo a journal left in ``state_dir`` and remove stale pins: (restored, failures, pins)."""
    report = restore_journal(state_dir)
    pins = bpfmod.remove_all_pins()
    return report.restored, report.failed, pins
