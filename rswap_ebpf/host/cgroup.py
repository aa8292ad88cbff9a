"""Cgroups: where a task lives, and the writers that limit its CPU.

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

    def resolve(self, name: str, rel: str | None) -> TaskCgroup:
        """The task's directories: ``rel`` (an existing cgroup) or rswap's own ``rswap/<name>``."""
        check_task_name(name)
        owned = rel is None
        rel_path = f"{RSWAP_SUBTREE}/{name}" if owned else rel.strip("/")
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


# -- CPU writers ------------------------------------------------------------------------------

V1_MIN_QUOTA_US = 1000
V1_MIN_SHARES, V1_MAX_SHARES = 2, 262144
V2_MIN_WEIGHT, V2_MAX_WEIGHT = 1, 10000


@dataclass(frozen=True)
class CpuShape:
    """What a task's tier adds to its quota (latency against throughput).

    ``burst``: let up to one quota of unused run time carry over between CFS periods
    (``cpu.cfs_burst_us`` / ``cpu.max.burst``), so a critical task that idled between bursts
    spends its savings at a burst's edge instead of being throttled until the next tick raises
    its quota.  ``weight``: multiplies shares/weight, so a critical task that wakes wins the CPU
    from runnable batch work.  ``idle``: ``cpu.idle`` = 1, the group runs as SCHED_IDLE: it still
    fills every idle CPU, but any other task that wakes preempts it at once.
    """

    burst: bool = False
    weight: float = 1.0
    idle: bool = False


@dataclass(frozen=True)
class ThrottleStats:
    """A cgroup's CFS bandwidth counters: periods its quota ran out in, and the time its
    runnable threads then waited (ns, summed over CPUs; None where the kernel lacks it)."""

    periods: int
    throttled_ns: int | None = None


class CpuWriter:
    """Turns a millicore allocation into cgroup file writes for one cgroup version."""

    version = ""
    burst_file = ""

    def plan(self, cg: TaskCgroup, millicores: int, shape: CpuShape = CpuShape()) -> list[Write]:
        raise NotImplementedError

    def current(self, cg: TaskCgroup) -> int | None:
        """The millicore limit in force now (None: unlimited)."""
        raise NotImplementedError


    def throttle_stats(self, cg: TaskCgroup) -> ThrottleStats | None:
        """``nr_throttled`` and the throttled time from the task's ``cpu.stat`` (None: unreadable).

        v1 counts ``throttled_time`` in ns, v2 ``throttled_usec``; both sum over the CPUs the
        group's runqueues were held on, so a task with two runnable threads held for a whole
        second adds about 2 s.
        """
        periods, ns = None, None
        try:
            with open(os.path.join(self._dir(cg), "cpu.stat")) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "nr_throttled":
                        periods = int(value)
                    elif key == "throttled_time":
                        ns = int(value)
                    elif key == "throttled_usec":
                        ns = int(value) * 1000
        except (OSError, ValueError, FeatureMissing):
            return None
        return None if periods is None else ThrottleStats(periods, ns)

    def _dir(self, cg: TaskCgroup) -> str:
        raise NotImplementedError


class CgroupV1CpuWriter(CpuWriter):
    """``cpu.cfs_quota_us`` over the existing ``cpu.cfs_period_us``, ``cpu.shares``, and where the
    tier asks and the kernel has them, ``cpu.cfs_burst_us`` and ``cpu.idle``."""

    version = "v1"
    burst_file = "cpu.cfs_burst_us"

    def _dir(self, cg: TaskCgroup) -> str:
        try:
            return cg.dirs["cpu"]
        except KeyError:
            raise FeatureMissing("cgroup v1 cpu controller", "not mounted") from None

    def period_us(self, cg: TaskCgroup) -> int:
        return int(_read(os.path.join(self._dir(cg), "cpu.cfs_period_us")))

    def plan(self, cg: TaskCgroup, millicores: int, shape: CpuShape = CpuShape()) -> list[Write]:
        d = self._dir(cg)
        period = self.period_us(cg)
        quota = max(V1_MIN_QUOTA_US, millicores * period // 1000)
        writes = _with_burst(d, self.burst_file, [(os.path.join(d, "cpu.cfs_quota_us"), str(quota))],
                             quota, shape)
        if shape.idle and os.path.exists(os.path.join(d, "cpu.idle")):
            # An idle group has no shares of its own (the kernel refuses the write).
            return writes + [(os.path.join(d, "cpu.idle"), "1")]
        shares = min(V1_MAX_SHARES, max(V1_MIN_SHARES,
                                        int(millicores * 1024 * shape.weight) // 1000))
        return writes + [(os.path.join(d, "cpu.shares"), str(shares))]

    def current(self, cg: TaskCgroup) -> int | None:
        d = self._dir(cg)
        quota = int(_read(os.path.join(d, "cpu.cfs_quota_us")))
        if quota < 0:
            return None
        return quota * 1000 // self.period_us(cg)


class CgroupV2CpuWriter(CpuWriter):
    """``cpu.max`` ("quota period"), ``cpu.weight``, and ``cpu.max.burst``/``cpu.idle`` where the
    tier asks and the kernel has them."""

    version = "v2"
    burst_file = "cpu.max.burst"

    def _dir(self, cg: TaskCgroup) -> str:
        d = cg.dirs.get("unified")
        if d is None:
            raise FeatureMissing("cgroup v2", "not mounted")
        return d

    def plan(self, cg: TaskCgroup, millicores: int, shape: CpuShape = CpuShape()) -> list[Write]:
        d = self._dir(cg)
        period = int(_read(os.path.join(d, "cpu.max")).split()[1])
        quota = max(V1_MIN_QUOTA_US, millicores * period // 1000)
        writes = _with_burst(d, self.burst_file, [(os.path.join(d, "cpu.max"), f"{quota} {period}")],
                             quota, shape)
        if shape.idle and os.path.exists(os.path.join(d, "cpu.idle")):
            return writes + [(os.path.join(d, "cpu.idle"), "1")]
        weight = min(V2_MAX_WEIGHT, max(V2_MIN_WEIGHT, int(millicores * shape.weight) // 10))
        return writes + [(os.path.join(d, "cpu.weight"), str(weight))]

    def current(self, cg: TaskCgroup) -> int | None:
        quota, period = _read(os.path.join(self._dir(cg), "cpu.max")).split()
        if quota == "max":
            return None
        return int(quota) * 1000 // int(period)


def _with_burst(d: str, name: str, quota_write: list[Write], quota_us: int,
                shape: CpuShape) -> list[Write]:
    """Add the burst file (one quota: the kernel's bound is burst <= quota) in an order the kernel
    accepts: it checks the pair on every write, so a burst that shrinks goes before the quota."""
    path = os.path.join(d, name)
    if not shape.burst or not os.path.exists(path):
        return quota_write
    try:
        now = int(_read(path))
    except (OSError, ValueError):
        now = 0
    burst = [(path, str(quota_us))]
    return burst + quota_write if quota_us < now else quota_write + burst


def burst_supported(mounts: CgroupMounts) -> str | None:
    """The CFS burst file this host's CPU writer would use, or None when the kernel lacks it
    (before 5.14, or CONFIG_CFS_BANDWIDTH off): probed on the hierarchy's root."""
    try:
        w = cpu_writer(mounts)
    except FeatureMissing:
        return None
    root = mounts.unified if w.version == "v2" else mounts.v1.get("cpu")
    if not root:
        return None
    if os.path.exists(os.path.join(root, w.burst_file)):
        return w.burst_file
    # cgroup2's root has no cpu.* files: look one level down.
    for entry in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        if os.path.exists(os.path.join(root, entry, w.burst_file)):
            return w.burst_file
    # Where no cgroup has cpu enabled yet (systemd leaves it off until a unit asks), no file shows
    # it; the controller is offered, so the kernel's version decides (cpu.max.burst came in 5.14).
    if w.version == "v2" and "cpu" in mounts.v2_controllers() and _kernel_at_least(5, 14):
        return w.burst_file
    return None


def _kernel_at_least(major: int, minor: int, release: str | None = None) -> bool:
    try:
        parts = (release or os.uname().release).split(".")
        return (int(parts[0]), int(parts[1].split("-")[0])) >= (major, minor)
    except (ValueError, IndexError):
        return False


def cpu_writer(mounts: CgroupMounts) -> CpuWriter:
    """v2 where the cpu controller is enabled there, else v1's cpu controller."""
    if mounts.mode == "unified" or "cpu" in mounts.v2_controllers() and "cpu" not in mounts.v1:
        return CgroupV2CpuWriter()
    if "cpu" in mounts.v1:
        return CgroupV1CpuWriter()
    raise FeatureMissing("cgroup cpu controller", "neither cgroup v2 nor v1 offers it",
                         "enable it: echo +cpu > /sys/fs/cgroup/cgroup.subtree_control")


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
            try:
                now = _read(path)
            except OSError as err:
                raise EnforceError(path, f"cannot read: {err.strerror}") from err
            last = self._last.get(path)
            if last is not None and now != last:
                log.warning("%s was changed by hand (%r, rswap wrote %r): leaving it alone",
                            path, now, last)
                self.overridden.add(path)
                continue
            if now == value:
                self._last[path] = value
                continue
            self.journal.record_write(path)
            try:
                write_file(path, value)
            except OSError as err:
                raise EnforceError(path, f"cannot write {value!r}: {err.strerror}") from err
            self._last[path] = _read(path)
            done.append((path, value))
        return done

    def forget(self, prefixes: tuple[str, ...]) -> None:
        """A task has left: what rswap wrote below ``prefixes`` is no longer watched."""
        for path in [p for p in self._last if p.startswith(prefixes)]:
            del self._last[path]
        self.overridden = {p for p in self.overridden if not p.startswith(prefixes)}


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


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
