"""The undo journal: every change rswap makes to the host, recorded on disk before it is made.

One JSON object per line, appended and fsynced *before* the change, so that a kill at any point
(even between the journal write and the kernel write) leaves enough to undo it.  ``restore``
replays the entries backwards; entries whose target is already gone are skipped, so restoring
twice is harmless.

Entry kinds (``op``):

``write``   a file rswap is about to write for the first time; ``original`` is its content.
``mkdir``   a directory rswap created (cgroups); restore empties it into its parent (cgroup2: the
            nearest ancestor allowed to hold processes) and removes it
            (a ``shared`` parent, such as ``rswap/``, is removed only when nothing else is in it).
``move``    a pid rswap moved between cgroups; restore moves it back to ``procs`` (its old
            cgroup's ``cgroup.procs``).
``custom``  an entry owned by an enforcer that registered an undo handler for ``kind``
            (qdiscs, resctrl groups...); ``data`` is passed back to that handler.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import JournalError

log = logging.getLogger(__name__)

UndoHandler = Callable[[dict], None]
_UNDO_HANDLERS: dict[str, UndoHandler] = {}


def register_undo(kind: str, handler: UndoHandler) -> None:
    """Let an enforcer undo its own ``custom`` entries (called at import of that enforcer)."""
    _UNDO_HANDLERS[kind] = handler


@dataclass(frozen=True)
class RestoreReport:
    restored: int
    skipped: int
    failed: list[str]


class Journal:
    """Append-only, fsynced undo log at ``path``."""

    def __init__(self, path: str):
        self.path = path
        self._seen_writes: set[str] = set()
        self._lock = threading.Lock()
        self._fd: int | None = None
        for entry in self.entries():
            if entry.get("op") == "write":
                self._seen_writes.add(entry["path"])

    # -- recording ---------------------------------------------------------------------
    def _append(self, entry: dict[str, Any]) -> None:
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        with self._lock:
            try:
                if self._fd is None:
                    os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
                    self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                os.write(self._fd, line)
                os.fsync(self._fd)
            except OSError as err:
                raise JournalError(
                    f"cannot write the journal {self.path}: {err.strerror}; nothing was changed"
                ) from err
        _fault_point()

    def record_write(self, path: str) -> bool:
        """Journal ``path``'s current content unless already journalled; True if recorded now."""
        if path in self._seen_writes:
            return False
        try:
            with open(path) as f:
                original = f.read()
        except OSError as err:
            raise JournalError(f"cannot read {path} before changing it: {err.strerror}") from err
        self._append({"op": "write", "path": path, "original": original})
        self._seen_writes.add(path)
        return True

    def record_mkdir(self, path: str, shared: bool = False) -> None:
        """``shared``: a parent other runs may also use; restore removes it only when empty."""
        self._append({"op": "mkdir", "path": path, "shared": shared})

    def record_move(self, pid: int, procs: str) -> None:
        self._append({"op": "move", "pid": pid, "procs": procs})

    def record_custom(self, kind: str, data: dict) -> None:
        self._append({"op": "custom", "kind": kind, "data": data})

    # -- reading and undoing -----------------------------------------------------------
    def entries(self) -> list[dict]:
        try:
            with open(self.path) as f:
                lines = f.readlines()
        except FileNotFoundError:
            return []
        except OSError as err:
            raise JournalError(f"cannot read the journal {self.path}: {err.strerror}") from err
        out = []
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line:
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                # Only the last line can be torn by a crash mid-append; it was never acted on.
                if number == len(lines):
                    log.warning("journal %s: ignoring a torn last line", self.path)
                    continue
                raise JournalError(f"{self.path}:{number}: not valid JSON; inspect it by hand")
            if isinstance(entry, dict) and "op" in entry:
                out.append(entry)
        return out

    def restore(self) -> RestoreReport:
        """Undo every entry, newest first, then remove the journal."""
        entries = self.entries()
        restored = skipped = 0
        failed: list[str] = []
        done_writes: set[str] = set()
        for entry in reversed(entries):
            try:
                if _undo(entry, done_writes):
                    restored += 1
                else:
                    skipped += 1
            except OSError as err:
                failed.append(f"{_describe(entry)}: {err.strerror or err}")
            except Exception as err:  # an undo handler's own error: report, carry on
                failed.append(f"{_describe(entry)}: {err}")
        self.close()
        if not failed:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self._seen_writes.clear()
        return RestoreReport(restored, skipped, failed)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __bool__(self) -> bool:
        return os.path.exists(self.path) and bool(self.entries())


_FAULT_ENV = "RSWAP_FAULT_KILL_AFTER_JOURNAL"
_appended = 0


def _fault_point() -> None:
    """Crash-safety tests: ``RSWAP_FAULT_KILL_AFTER_JOURNAL=N`` SIGKILLs this process right after
    its Nth entry is on disk and before the change it announces is made."""
    global _appended
    at = os.environ.get(_FAULT_ENV)
    if not at:
        return
    _appended += 1
    if str(_appended) == at.strip():
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _describe(entry: dict) -> str:
    return f"{entry.get('op')} {entry.get('path') or entry.get('kind') or entry.get('pid')}"


def _undo(entry: dict, done_writes: set[str]) -> bool:
    op = entry["op"]
    if op == "write":
        path = entry["path"]
        # The oldest entry for a path holds its true original; reversed order reaches it last.
        done_writes.add(path)
        if not os.path.exists(path):
            return False
        write_file(path, entry["original"])
        return True
    if op == "mkdir":
        if entry.get("shared"):
            try:
                os.rmdir(entry["path"])
                return True
            except FileNotFoundError:
                return False
            except OSError as err:
                if err.errno in (errno.ENOTEMPTY, errno.EBUSY):
                    return False
                raise
        return remove_cgroup_dir(entry["path"])
    if op == "move":
        try:
            write_file(entry["procs"], str(entry["pid"]))
        except OSError as err:
            if err.errno in (errno.ESRCH, errno.ENOENT):
                return False
            raise
        return True
    if op == "custom":
        handler = _UNDO_HANDLERS.get(entry["kind"])
        if handler is None:
            _import_enforcers()
            handler = _UNDO_HANDLERS.get(entry["kind"])
        if handler is None:
            raise JournalError(f"no undo handler for journal entry kind {entry['kind']!r}")
        handler(entry["data"])
        return True
    return False


def _import_enforcers() -> None:
    """Importing the enforcers registers their undo handlers (restore runs in a fresh process)."""
    import importlib
    import pkgutil

    from .. import enforce

    for mod in pkgutil.iter_modules(enforce.__path__):
        importlib.import_module(f"{enforce.__name__}.{mod.name}")


def write_file(path: str, value: str) -> None:
    """One write(2) of ``value``, as the kernel's cgroup and resctrl files expect."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def remove_cgroup_dir(path: str) -> bool:
    """Move what is left in cgroup ``path`` (and below) to its parent, then rmdir it."""
    if not os.path.isdir(path):
        return False
    for sub in sorted(_subdirs(path), key=len, reverse=True):
        _evacuate(sub)
        try:
            os.rmdir(sub)
        except OSError:
            pass
    _evacuate(path)
    for attempt in range(50):
        try:
            os.rmdir(path)
            return True
        except OSError as err:
            if err.errno != errno.EBUSY:
                raise
            _evacuate(path)
            import time

            time.sleep(0.02)
    os.rmdir(path)
    return True


def _subdirs(path: str) -> Iterable[str]:
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            yield os.path.join(dirpath, d)


def _process_home(path: str) -> str:
    """The nearest ancestor of cgroup ``path`` that may hold processes.

    v1: the parent.  cgroup2 refuses processes (EBUSY) in a non-root cgroup whose
    ``cgroup.subtree_control`` enables a controller ("no internal processes"), as rswap's own
    parent does on a unified host: go up until one enables none, or to the mount's root.
    """
    home = os.path.dirname(path)
    while True:
        try:
            with open(os.path.join(home, "cgroup.subtree_control")) as f:
                enabled = bool(f.read().split())
        except OSError:
            return home  # v1, or no such file: the parent takes them
        up = os.path.dirname(home)
        if not enabled or not os.path.exists(os.path.join(up, "cgroup.procs")):
            return home
        home = up


def _evacuate(path: str) -> None:
    procs = os.path.join(path, "cgroup.procs")
    parent_procs = os.path.join(_process_home(path), "cgroup.procs")
    if not os.path.exists(procs) or not os.path.exists(parent_procs):
        return
    with open(procs) as f:
        pids = [p for p in f.read().split() if p]
    for pid in pids:
        try:
            write_file(parent_procs, pid)
        except OSError as err:
            if err.errno not in (errno.ESRCH, errno.EINVAL):
                raise
