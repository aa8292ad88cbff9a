"""Cgroups: where a task lives, its pids, and the journalled file writer (CPU limits: host.cpu.writer).

The mode is detected once from the mount table (senpai/containerd style):

``unified``  cgroup2 at the cgroup root: one directory per task, ``cpu.max``/``cpu.weight``.
``hybrid``   v1 controllers under the root and cgroup2 at ``<root>/unified`` (this host): the
             cgroup2 directory gives the task the id BPF sees (``bpf_get_current_cgroup_id``),
             the v1 directories (cpu, blkio) enforce; rswap keeps them in step.
``legacy``   v1 only: enforcement works, BPF cannot attribute by cgroup.

What is written is first built as a list of ``(path, value)`` pairs; that list is what the journal,
``--dry-run`` and the tests look at.
"""
from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from rswap_ebpf import paths
from rswap_ebpf.errors import ConfigError, EnforceError, FeatureMissing
from rswap_ebpf.host.journal import (Journal, allow_root, created_by_rswap, register_undo, remove_cgroup_dir,
                      write_file)

log = logging.getLogger(__name__)

RSWAP_SUBTREE = "rswap"
#: Where rswap makes the cgroups of its ``batch`` tasks: beside ``rswap/``, not in it.  A parent's
#: weight goes to whichever of its children can run, so batch tasks inside ``rswap/`` (which
#: carries its critical tasks' weight) would compete with the rest of the host at the critical
#: weight whenever the critical tasks sleep (docs/colocation.md, "Where the tasks live").
BATCH_SUBTREE = "rswap-batch"
OWNED_SUBTREES = (RSWAP_SUBTREE, BATCH_SUBTREE)


def owned_subtree(priority: str | None) -> str:
    """The top-level directory rswap makes a task of this priority in."""
    return BATCH_SUBTREE if priority == "batch" else RSWAP_SUBTREE
#: v1 controllers a task is placed in on hybrid/legacy hosts, when mounted.
V1_CONTROLLERS = ("cpu", "cpuacct", "blkio")
#: cgroup2 controllers rswap enables for its tasks on a unified host.
V2_CONTROLLERS = ("cpu", "io", "memory")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

Write = tuple[str, str]


@dataclass(frozen=True)
class CgroupMounts:
    mode: str
    unified: str | None
    v1: dict[str, str] = field(default_factory=dict)

    @property
    def hierarchies(self) -> dict[str, str]:
        """Name -> mount point of every hierarchy a task directory is made in."""
        out = {}
        if self.unified:
            out["unified"] = self.unified
        for ctrl in V1_CONTROLLERS:
            if ctrl in self.v1:
                out[ctrl] = self.v1[ctrl]
        return out

    def v2_controllers(self) -> set[str]:
        if not self.unified:
            return set()
        try:
            with open(os.path.join(self.unified, "cgroup.controllers")) as f:
                return set(f.read().split())
        except OSError:
            return set()


def detect_mounts(mounts_file: str | None = None) -> CgroupMounts:
    """Read the mount table and classify the cgroup layout under ``paths.root('CGROUP_ROOT')``."""
    root = os.path.realpath(paths.root("CGROUP_ROOT"))
    mounts_file = mounts_file or os.environ.get("RSWAP_MOUNTS_FILE") or os.path.join(
        paths.root("PROCFS_ROOT"), "self/mounts")
    unified = None
    root_is_v2 = False
    v1: dict[str, str] = {}
    try:
        with open(mounts_file) as f:
            lines = f.readlines()
    except OSError as err:
        raise FeatureMissing("cgroup mount table", f"cannot read {mounts_file}: {err.strerror}") from err
    for line in lines:
        parts = line.split()
        if len(parts) < 4:
            continue
        mnt = parts[1].replace("\\040", " ")
        fstype, opts = parts[2], parts[3].split(",")
        if not (mnt == root or mnt.startswith(root + "/")):
            continue
        if fstype == "cgroup2":
            if mnt == root:
                root_is_v2 = True
            unified = mnt
        elif fstype == "cgroup":
            for opt in opts:
                if opt in ("cpu", "cpuacct", "blkio", "memory", "cpuset", "pids", "io"):
                    v1.setdefault(opt, mnt)
    if root_is_v2:
        return CgroupMounts("unified", root, {})
    if v1:
        return CgroupMounts("hybrid" if unified else "legacy", unified, v1)
    if unified:
        return CgroupMounts("unified", unified, {})
    raise FeatureMissing("cgroups", f"no cgroup filesystem is mounted under {root}",
                         "mount cgroup2 on /sys/fs/cgroup (systemd does this at boot)")


def check_task_name(name: object, field_name: str = "name") -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigError(field_name, f"{name!r} is not a valid task name "
                                      "(letters, digits, '.', '_', '-'; at most 64)")
    return name


@dataclass(frozen=True)
class TaskCgroup:
    """A task's directory in each hierarchy (``unified``, ``cpu``, ``blkio``...)."""

    name: str
    rel: str
    dirs: dict[str, str]
    owned: bool

    @property
    def identity_dir(self) -> str | None:
        return self.dirs.get("unified")

    def cgroup_ids(self) -> set[int]:
        """Cgroup2 ids of the task's directory and its descendants (what BPF reports)."""
        top = self.identity_dir
        if not top or not os.path.isdir(top):
            return set()
        ids = {os.stat(top).st_ino}
        for dirpath, dirnames, _ in os.walk(top):
            for d in dirnames:
                try:
                    ids.add(os.stat(os.path.join(dirpath, d)).st_ino)
                except OSError:
                    pass
        return ids

    def pids(self) -> list[int]:
        d = self.identity_dir or next(iter(self.dirs.values()), None)
        if d is None:
            return []
        out: list[int] = []
        for dirpath, _, files in os.walk(d):
            if "cgroup.procs" in files:
                try:
                    with open(os.path.join(dirpath, "cgroup.procs")) as f:
                        out.extend(int(p) for p in f.read().split())
                except OSError:
                    pass
        return out

    def exists(self) -> bool:
        return all(os.path.isdir(d) for d in self.dirs.values())


class CgroupManager:
    """Creates, adopts and removes task cgroups; every change goes through the journal."""

    def __init__(self, journal: Journal, mounts: CgroupMounts | None = None):
        self.journal = journal
        self.mounts = mounts or detect_mounts()
        for mnt in self.mounts.hierarchies.values():
            allow_root(mnt)  # restore may act below the mounts this manager writes to

    def resolve(self, name: str, rel: str | None, priority: str | None = None) -> TaskCgroup:
        """The task's directories: ``rel`` (an existing cgroup) or rswap's own ``rswap/<name>``
        (``rswap-batch/<name>`` for a batch task: :data:`BATCH_SUBTREE`)."""
        check_task_name(name)
        owned = rel is None
        rel_path = f"{owned_subtree(priority)}/{name}" if owned else rel.strip("/")
        if not owned and ("\x00" in rel or not rel_path):
            raise ConfigError(f"task {name}.cgroup", f"{rel!r} is not a cgroup path")
        dirs = {}
        for hier, mnt in self.mounts.hierarchies.items():
            if not owned and rel.startswith("/") and not rel.startswith(mnt):
                # An absolute path is taken relative to every hierarchy's root, like systemd's.
                pass
            dirs[hier] = paths.confine(rel_path, mnt, f"task {name}.cgroup")
        return TaskCgroup(name, rel_path, dirs, owned)

    def create(self, cg: TaskCgroup) -> None:
        """Make rswap's own directories (journalled so restore removes them)."""
        for hier, d in cg.dirs.items():
            parent = os.path.dirname(d)
            if not os.path.isdir(parent):
                self.journal.record_mkdir(parent, shared=True)
                _mkdir(parent)
            if hier == "unified" and self.mounts.mode == "unified":
                self.enable_controllers(parent)
            if os.path.isdir(d):
                continue
            self.journal.record_mkdir(d)
            _mkdir(d)

    def adopt(self, cg: TaskCgroup) -> None:
        """Ready an existing cgroup for rswap's writers: on a unified host, enable cpu/io/memory
        in its ancestors, as :meth:`create` does for rswap's own (journalled, undone on restore).

        Without that, an adopted cgroup under a parent whose ``cgroup.subtree_control`` lacks the
        controller has no ``cpu.max``/``io.max`` to write (Debian 12's systemd enables only memory
        and pids at the root).
        """
        d = cg.dirs.get("unified")
        if d is not None and self.mounts.mode == "unified":
            self.enable_controllers(os.path.dirname(d))

    def enable_controllers(self, parent: str,
                           controllers: Iterable[str] = V2_CONTROLLERS) -> list[str]:
        """On a unified host, switch on cpu/io/memory (or ``controllers``: cpuset for
        enforce.cpuset) for ``parent``'s children, root down.

        cgroup2 creates ``cpu.max``/``io.max``/``memory.high`` in a child only when its parent's
        ``cgroup.subtree_control`` enables the controller.  Each controller rswap enables is
        journalled (``cgroup_controllers``) and switched off again on restore.
        """
        root = self.mounts.unified
        if not root:
            return []
        wanted = self.mounts.v2_controllers() & set(controllers)
        if not wanted:
            return []
        chain = [root]
        rel = os.path.relpath(parent, root)
        if rel != ".":
            for part in rel.split(os.sep):
                chain.append(os.path.join(chain[-1], part))
        done: list[str] = []
        for d in chain:
            ctl = os.path.join(d, "cgroup.subtree_control")
            try:
                with open(ctl) as f:
                    on = set(f.read().split())
            except OSError as err:
                raise EnforceError(ctl, f"cannot read: {err.strerror}") from err
            missing = sorted(wanted - on)
            if not missing:
                continue
            self.journal.record_custom("cgroup_controllers", {"path": ctl, "enabled": missing})
            try:
                write_file(ctl, " ".join(f"+{c}" for c in missing))
            except OSError as err:
                hint = (" (it has processes of its own: cgroup2 allows controllers only in "
                        "cgroups without them; move them into a child)") if err.errno == errno.EBUSY else ""
                raise EnforceError(ctl, f"cannot enable {', '.join(missing)}: {err.strerror}{hint}") from err
            done.extend(f"{d}:{c}" for c in missing)
        return done

    def check_exists(self, cg: TaskCgroup) -> None:
        for hier, d in cg.dirs.items():
            if not os.path.isdir(d):
                raise ConfigError(f"task {cg.name}.cgroup",
                                  f"{d} does not exist (create the cgroup or give a command)")

    def move(self, cg: TaskCgroup, pid: int) -> None:
        """Put ``pid`` in the task's directory of every hierarchy, journalling where it was."""
        check_pid(cg.name, pid)
        origin = self.current_cgroups(pid)
        for hier, d in cg.dirs.items():
            old = origin.get(hier)
            if old is not None:
                self.journal.record_move(pid, os.path.join(old, "cgroup.procs"))
            try:
                write_file(os.path.join(d, "cgroup.procs"), str(pid))
            except OSError as err:
                if err.errno == errno.ESRCH:
                    raise ConfigError(f"task {cg.name}.pids", f"process {pid} has exited") from err
                raise EnforceError(d, f"cannot move pid {pid}: {err.strerror}") from err

    def current_cgroups(self, pid: int) -> dict[str, str]:
        """Hierarchy name -> directory ``pid`` is in now (from /proc/<pid>/cgroup)."""
        out: dict[str, str] = {}
        for hid, ctrls, rel in proc_cgroups(pid):
            if hid == "0" and ctrls == "":
                if self.mounts.unified:
                    out["unified"] = os.path.join(self.mounts.unified, rel.lstrip("/"))
                continue
            for ctrl in ctrls.split(","):
                mnt = self.mounts.hierarchies.get(ctrl)
                if mnt and ctrl != "unified":
                    out[ctrl] = os.path.join(mnt, rel.lstrip("/"))
        return out

    def remove(self, cg: TaskCgroup) -> None:
        if not cg.owned:
            return
        for d in cg.dirs.values():
            try:
                remove_cgroup_dir(d)
            except OSError as err:
                log.warning("could not remove %s: %s", d, err.strerror)

    def kill(self, cg: TaskCgroup, sig: int) -> int:
        """Send ``sig`` to every process of the task; the number signalled."""
        n = 0
        for pid in cg.pids():
            try:
                os.kill(pid, sig)
                n += 1
            except ProcessLookupError:
                pass
        return n


def check_pid(task: str, pid: int) -> None:
    """Refuse, before anything is journalled, a pid that cannot be moved into a cgroup."""
    if not os.path.exists(os.path.join(paths.root("PROCFS_ROOT"), str(pid))):
        raise ConfigError(f"task {task}.pids", f"no process with pid {pid}")
    from rswap_ebpf.host.process import is_kernel_thread

    if is_kernel_thread(pid):
        raise ConfigError(f"task {task}.pids", f"pid {pid} is a kernel thread, which no cgroup "
                          "can hold; remove it from pids")


def proc_cgroups(pid: int) -> list[tuple[str, str, str]]:
    """``/proc/<pid>/cgroup`` as (hierarchy id, controllers, path) lines; [] once it has exited."""
    try:
        with open(os.path.join(paths.root("PROCFS_ROOT"), str(pid), "cgroup")) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    return [tuple(line.split(":", 2)) for line in lines if line.count(":") >= 2]


def _mkdir(path: str) -> None:
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        pass
    except OSError as err:
        raise EnforceError(path, f"cannot create cgroup: {err.strerror}") from err


class FileApplier:
    """Writes planned ``(path, value)`` pairs: journal first, and back off from hand edits.

    Like bpftune, it re-reads a file before writing: when the value there is neither what rswap
    last wrote nor its original, an administrator changed it, and rswap leaves that file alone.
    """

    def __init__(self, journal: Journal, dry_run: bool = False):
        self.journal = journal
        self.dry_run = dry_run
        self._last: dict[str, str] = {}
        self.overridden: set[str] = set()
        self.planned: list[Write] = []

    def apply(self, writes: Sequence[Write]) -> list[Write]:
        done: list[Write] = []
        for path, value in writes:
            if self.dry_run:
                self.planned.append((path, value))
                continue
            if path in self.overridden:
                continue
            # read, write and read back through one descriptor: opening is most of what a
            # write costs; a file that will not open for both goes the three-open way
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                if self._apply_one(path, value, None):
                    done.append((path, value))
                continue
            try:
                if self._apply_one(path, value, fd):
                    done.append((path, value))
            finally:
                os.close(fd)
        return done

    def _apply_one(self, path: str, value: str, fd: int | None) -> bool:
        """Read ``path``, back off from a hand edit, write ``value``, keep what the kernel
        shows; True if written.  ``fd``: the file open for reading and writing (else None)."""
        size = [0]  # bytes the file held before: a longer write needs no truncation first
        try:
            now = _read(path) if fd is None else _pread(path, fd, size)
        except OSError as err:
            raise EnforceError(path, f"cannot read: {err.strerror}") from err
        last = self._last.get(path)
        if last is not None and now != last:
            log.warning("%s was changed by hand (%r, rswap wrote %r): leaving it alone",
                        path, now, last)
            self.overridden.add(path)
            return False
        if now == value:
            self._last[path] = value
            return False
        self.journal.record_write(path)
        try:
            if fd is None:
                write_file(path, value)
            else:  # as write_file: truncated, then one write(2)
                data = (value or "\n").encode()
                if len(data) < size[0]:
                    os.ftruncate(fd, 0)
                os.pwrite(fd, data, 0)
        except OSError as err:
            raise EnforceError(path, f"cannot write {value!r}: {err.strerror}") from err
        self._last[path] = _read(path) if fd is None else _pread(path, fd)
        return True

    def forget(self, prefixes: tuple[str, ...]) -> None:
        """A task has left: what rswap wrote below ``prefixes`` is no longer watched."""
        for path in [p for p in self._last if p.startswith(prefixes)]:
            del self._last[path]
        self.overridden = {p for p in self.overridden if not p.startswith(prefixes)}


def _read(path: str) -> str:
    """The file's text, stripped.  Read with plain system calls: the applier reads each file
    twice per write (before, to see hand edits, and after), and a text-mode open() costs more
    than the read.  Kernel files are ASCII without carriage returns; anything else is read
    again the text-mode way, so the answer is the same as ``open(path).read().strip()``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _pread(path, fd)
    finally:
        os.close(fd)


def _pread(path: str, fd: int, size: list[int] | None = None) -> str:
    """:func:`_read` through ``fd``, open on ``path``, from its start (a cgroup file shows
    its value again on each read from 0); ``size[0]`` is set to the bytes read."""
    data = os.pread(fd, _READ_CHUNK, 0)
    if len(data) == _READ_CHUNK:
        chunks = [data]
        while True:
            more = os.pread(fd, _READ_CHUNK, sum(map(len, chunks)))
            if not more:
                break
            chunks.append(more)
        data = b"".join(chunks)
    if size is not None:
        size[0] = len(data)
    if data.isascii() and b"\r" not in data:
        return data.decode("ascii").strip()
    with open(path) as f:
        return f.read().strip()


_READ_CHUNK = 65536


def online_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


#: What each controller's files in a child hold until someone configures them
#: (Documentation/admin-guide/cgroup-v2.rst); a file not listed here (stat, pressure...) is not
#: configuration.  ``cpu.max`` is judged by its quota alone (the period may differ).
_V2_DEFAULTS = {
    "cpu": {"cpu.max": "max", "cpu.weight": "100", "cpu.max.burst": "0", "cpu.idle": "0",
            "cpu.uclamp.min": "0.00", "cpu.uclamp.max": "max"},
    "io": {"io.max": "", "io.weight": "default 100", "io.latency": "",
           "io.prio.class": "no-change"},
    "memory": {"memory.min": "0", "memory.low": "0", "memory.high": "max", "memory.max": "max",
               "memory.swap.high": "max", "memory.swap.max": "max", "memory.zswap.max": "max",
               "memory.oom.group": "0"},
}


def controller_in_use(child: str, controller: str) -> str | None:
    """Why cgroup ``child`` depends on ``controller`` of its parent, or None when it does not.

    It does when it passes the controller on (``cgroup.subtree_control`` names it: the kernel
    would refuse to switch it off, EBUSY) or when any of the controller's files in it holds
    something other than the kernel's default: someone configured it (systemd's CPUWeight=, an
    admin's memory.max), and switching the controller off would silently drop that setting.
    """
    try:
        with open(os.path.join(child, "cgroup.subtree_control")) as f:
            if controller in f.read().split():
                return f"{child} enables it for its children"
    except OSError:
        pass
    for name, default in _V2_DEFAULTS.get(controller, {}).items():
        try:
            with open(os.path.join(child, name)) as f:
                value = f.read().strip()
        except OSError:
            continue
        if name == "cpu.max":
            value = value.split()[0] if value else default
        if value != default:
            return f"{child}/{name} is {value!r}"
    return None


def _undo_controllers(data: dict) -> None:
    """Switch off what ``enable_controllers`` switched on, unless something else now uses it.

    The rule: a controller rswap enabled in ``P/cgroup.subtree_control`` is switched off only if
    no child cgroup of ``P`` other than rswap's own (the directories this journal created, which
    restore removes) depends on it (:func:`controller_in_use`: it enables it further down, or has
    one of its files set away from the default).  Children that merely exist (created since, with
    default settings) lose nothing when it goes.  A controller left on is reported, never forced
    off; the kernel's EBUSY (a child that enables it, raced in) is treated the same way.
    """
    ctl = data["path"]
    parent = os.path.dirname(ctl)
    ours = created_by_rswap.get()
    try:
        children = [os.path.join(parent, n) for n in sorted(os.listdir(parent))
                    if os.path.isdir(os.path.join(parent, n))]
    except OSError:
        children = []
    others = [c for c in children if os.path.realpath(c) not in ours]
    for c in data["enabled"]:
        users = [why for why in (controller_in_use(child, c) for child in others) if why]
        if users:
            log.warning("%s: leaving %s on: %s", ctl, c, "; ".join(users))
            continue
        try:
            write_file(ctl, f"-{c}")
        except OSError as err:
            if err.errno not in (errno.EBUSY, errno.ENOENT, errno.EINVAL):
                raise
            log.warning("%s: leaving %s on (%s)", ctl, c, err.strerror)


register_undo("cgroup_controllers", _undo_controllers)
