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

Restore does not trust the file: root acts on every path an entry names, so each one (``path``,
``procs``, and in ``custom`` data ``path``, ``procs``, ``root`` and ``root``/``group``) must lie in
the cgroup, resctrl or bpffs mounts, and ``name``/``netns`` must be single path components.  An
entry that fails (``..``, a symlink out, an absolute path elsewhere, a NUL byte, not a string) is
refused and reported, the others are restored, and the journal is kept for inspection.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from rswap_ebpf import paths
from rswap_ebpf.errors import ConfigError, JournalError

log = logging.getLogger(__name__)

UndoHandler = Callable[[dict], None]
_UNDO_HANDLERS: dict[str, UndoHandler] = {}

#: While :meth:`Journal.restore` runs: the directories that journal records rswap as having
#: created.  Undo handlers consult it to tell rswap's own cgroups from everybody else's.
created_by_rswap: ContextVar[frozenset[str]] = ContextVar("created_by_rswap", default=frozenset())


def register_undo(kind: str, handler: UndoHandler) -> None:
    """Let an enforcer undo its own ``custom`` entries (called at import of that enforcer)."""
    _UNDO_HANDLERS[kind] = handler


@dataclass(frozen=True)
class RestoreReport:
    restored: int
    skipped: int
    failed: list[str]
    #: entries not acted on because a path they name lies outside the mounts (also in ``failed``)
    refused: list[str] = field(default_factory=list)


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
        # restore acts as root on what the journal says: only root may have written it
        paths.check_private(os.path.dirname(os.path.abspath(self.path)),
                            (os.path.basename(self.path),))
        try:
            with open(self.path, "rb") as f:
                lines = f.readlines()
        except FileNotFoundError:
            return []
        except OSError as err:
            raise JournalError(f"cannot read the journal {self.path}: {err.strerror}") from err
        out = []
        for number, raw in enumerate(lines, 1):
            raw = raw.strip()
            if not raw:
                continue
            try:
                entry = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError) as err:
                # Only the last line can be torn by a crash mid-append; it was never acted on.
                if number == len(lines):
                    log.warning("journal %s: ignoring a torn last line", self.path)
                    continue
                what = ("not UTF-8 text" if isinstance(err, UnicodeDecodeError)
                        else "not valid JSON")
                raise JournalError(f"{self.path}:{number}: {what}; inspect it by hand")
            if isinstance(entry, dict) and "op" in entry:
                out.append(entry)
        return out

    def restore(self) -> RestoreReport:
        """Undo every entry, newest first, then remove the journal.

        Entries naming a path outside the cgroup, resctrl and bpffs mounts are refused (reported
        in ``refused`` and ``failed``), the rest restored; the journal is kept if anything failed.
        """
        entries = self.entries()
        restored = skipped = 0
        failed: list[str] = []
        refused: list[str] = []
        done_writes: set[str] = set()
        bases = allowed_roots()
        checked: list[dict] = []
        for entry in entries:
            reason = _refusal(entry, bases)
            if reason is None:
                checked.append(entry)
            else:
                refused.append(f"{_describe(entry)}: refused: {reason}")
                log.error("journal %s: refusing an entry: %s", self.path, refused[-1])
        created = frozenset(os.path.realpath(e["path"]) for e in checked if e["op"] == "mkdir")
        token = created_by_rswap.set(created)
        try:
            for entry in reversed(checked):
                try:
                    if _undo(entry, done_writes):
                        restored += 1
                    else:
                        skipped += 1
                except OSError as err:
                    failed.append(f"{_describe(entry)}: {err.strerror or err}")
                except Exception as err:  # an undo handler's own error: report, carry on
                    failed.append(f"{_describe(entry)}: {err}")
        finally:
            created_by_rswap.reset(token)
        failed = refused + failed
        self.close()
        if not failed:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self._seen_writes.clear()
        return RestoreReport(restored, skipped, failed, refused)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __bool__(self) -> bool:
        return os.path.exists(self.path) and bool(self.entries())


def _describe(entry: dict) -> str:
    what = entry.get("path") or entry.get("kind") or entry.get("pid")
    return f"{entry.get('op')} {what!r}" if isinstance(what, str) and not what.isprintable() \
        else f"{entry.get('op')} {what}"


_EXTRA_ROOTS: set[str] = set()


def allow_root(path: str) -> None:
    """Accept entries below ``path`` too: a mount this process was handed explicitly (a
    :class:`CgroupMounts` or a registered resctrl tree that is not under the configured roots,
    as in tests).  Nothing read from a journal can add one."""
    _EXTRA_ROOTS.add(os.path.realpath(path))


def allowed_roots() -> list[str]:
    """The mounts a journal entry may name: cgroup, resctrl, bpffs (and rswap's pin directory)."""
    return [paths.root("CGROUP_ROOT"), paths.root("RESCTRL_ROOT"), paths.root("BPFFS_ROOT"),
            paths.pin_dir(), *sorted(_EXTRA_ROOTS)]


_OPS = {"write": ("path",), "mkdir": ("path",), "move": ("procs",), "custom": ()}


def _refusal(entry: dict, bases: list[str]) -> str | None:
    """Why ``entry`` must not be acted on, or None when every path it names is confined."""
    op = entry.get("op")
    if op not in _OPS:
        return f"unknown op {op!r}"
    named: list[object] = [entry.get(k) for k in _OPS[op]]
    if op == "custom":
        data = entry.get("data")
        if not isinstance(entry.get("kind"), str) or not isinstance(data, dict):
            return "a custom entry needs a kind and a data object"
        named += [data[k] for k in ("path", "procs", "root") if k in data]
        if "group" in data:
            if not isinstance(data.get("root"), str) or not isinstance(data["group"], str):
                return "group without a root"
            named.append(os.path.join(data["root"], data["group"]))
        for k in ("name", "netns"):
            v = data.get(k)
            if v is not None and (not isinstance(v, str) or not v or "/" in v or "\x00" in v
                                  or v in (".", "..")):
                return f"{k} {v!r} is not a plain name"
    if op == "move" and not isinstance(entry.get("pid"), int):
        return f"pid {entry.get('pid')!r} is not a number"
    for p in named:
        if not isinstance(p, str) or not p:
            return f"{p!r} is not a path"
        if not os.path.isabs(p):
            return f"{p!r} is not an absolute path"
        reason = "outside the cgroup, resctrl and bpffs mounts"
        for base in bases:
            try:
                paths.confine(p, base)
                reason = ""
                break
            except ConfigError as err:
                if "NUL" in str(err):
                    reason = "contains a NUL byte"
                    break
        if reason:
            return f"{p!r}: {reason}"
    return None


def _undo(entry: dict, done_writes: set[str]) -> bool:
    op = entry["op"]
    if op == "write":
        path = entry["path"]
        # The oldest entry for a path holds its true original; reversed order reaches it last.
        done_writes.add(path)
        if not os.path.exists(path):
            return False
        try:
            write_file(path, entry["original"])
        except OSError as err:
            # A populated cgroup v2 cpuset cannot go back to no cores of its own (ENOSPC); in a
            # directory rswap made that is moot: the directory goes (its mkdir entry comes next).
            if err.errno == errno.ENOSPC and \
                    os.path.realpath(os.path.dirname(path)) in created_by_rswap.get():
                return False
            raise
        return True
    if op == "mkdir":
        created = created_by_rswap.get()
        if entry.get("shared"):
            path = entry["path"]
            if not os.path.isdir(path):
                return False
            if any(True for _ in _subdirs(path)):
                return False  # another run's task is still in it
            # Empty of cgroups: what is left is processes an older restore evacuated into it.
            _evacuate(path, created)
            try:
                os.rmdir(path)
                return True
            except FileNotFoundError:
                return False
            except OSError as err:
                if err.errno in (errno.ENOTEMPTY, errno.EBUSY):
                    return False
                raise
        return remove_cgroup_dir(entry["path"], created)
    if op == "move":
        try:
            write_file(entry["procs"], str(entry["pid"]))
        except OSError as err:
            if err.errno in (errno.ESRCH, errno.ENOENT):
                return False
            if err.errno == errno.EINVAL:  # a pid no cgroup write can move (a kernel thread)
                log.warning("journal: pid %s cannot be moved back (%s); entry retired",
                            entry["pid"], err.strerror)
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


#: modules whose import registers an undo handler (restore may run in a fresh process)
ENFORCER_MODULES: tuple[str, ...] = (
    "rswap_ebpf.host.cgroup",
    "rswap_ebpf.host.cpu.cpuset",
    "rswap_ebpf.host.io.enforcer",
    "rswap_ebpf.host.net.tc",
    "rswap_ebpf.host.net.htb",
    "rswap_ebpf.host.net.ingress",
    "rswap_ebpf.host.cache.resctrl",
    "rswap_ebpf.host.process",
)


def _import_enforcers() -> None:
    """Importing the enforcers registers their undo handlers (restore runs in a fresh process)."""
    import importlib

    for name in ENFORCER_MODULES:
        importlib.import_module(name)


def write_file(path: str, value: str) -> None:
    """One write(2) of ``value``, as the kernel's cgroup and resctrl files expect.

    An empty value is written as a newline, as ``echo > file`` does: a write of zero bytes never
    reaches the file's handler, so a cgroup v2 ``cpuset.cpus`` that was empty (every core of the
    parent) would silently keep the cores rswap narrowed it to.
    """
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, (value or "\n").encode())
    finally:
        os.close(fd)


def remove_cgroup_dir(path: str, created: Iterable[str] = ()) -> bool:
    """Move what is left in cgroup ``path`` (and below) to its parent, then rmdir it.

    ``created``: directories rswap made (the journal's ``mkdir`` entries).  Processes never go
    into one of those, which would keep it (rswap's shared ``rswap/`` parent) from being removed
    in turn: they go to the nearest ancestor rswap did not create.
    """
    if not os.path.isdir(path):
        return False
    created = frozenset(created)
    for sub in sorted(_subdirs(path), key=len, reverse=True):
        _evacuate(sub, created)
        try:
            os.rmdir(sub)
        except OSError:
            pass
    _evacuate(path, created)
    for attempt in range(50):
        try:
            os.rmdir(path)
            return True
        except OSError as err:
            if err.errno != errno.EBUSY:
                raise
            _evacuate(path, created)
            import time

            time.sleep(0.02)
    os.rmdir(path)
    return True


def _subdirs(path: str) -> Iterable[str]:
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            yield os.path.join(dirpath, d)


def _process_home(path: str, created: frozenset[str] = frozenset()) -> str:
    """The nearest ancestor of cgroup ``path`` that may hold processes.

    v1: the parent.  cgroup2 refuses processes (EBUSY) in a non-root cgroup whose
    ``cgroup.subtree_control`` enables a controller ("no internal processes"), as rswap's own
    parent does on a unified host: go up until one enables none, or to the mount's root.
    An ancestor in ``created`` (rswap made it, and removes it next) is passed over as well.
    """
    home = os.path.dirname(path)
    while True:
        up = os.path.dirname(home)
        has_up = os.path.exists(os.path.join(up, "cgroup.procs"))
        if has_up and os.path.realpath(home) in created:
            home = up
            continue
        try:
            with open(os.path.join(home, "cgroup.subtree_control")) as f:
                enabled = bool(f.read().split())
        except OSError:
            return home  # v1, or no such file: the parent takes them
        if not enabled or not has_up:
            return home
        home = up


def _evacuate(path: str, created: frozenset[str] = frozenset()) -> None:
    procs = os.path.join(path, "cgroup.procs")
    parent_procs = os.path.join(_process_home(path, created), "cgroup.procs")
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
