"""Core isolation for the critical tier: lower tiers' cpuset shrinks while a burst is forecast.

Quota and weight decide *how much* CPU each tier gets; they do not stop a critical task's
wake-up from landing on a core a CPU-bound batch task is running on (it waits for a preemption,
and shares caches).  While the critical tier's allocation says a burst is coming, the normal and
batch tiers' cpuset leaves it ``N`` cores (``ceil(millicores / 1000)``, at least 1, never every
core the lower tiers may use); when the allocation falls, after the same hold as the quota, the
cores go back, so between bursts batch runs everywhere.

Three parts, so each can be tested alone:

- :func:`cores_wanted` / :class:`IsolationPolicy`: how many cores, tick by tick (rises at once,
  falls within the deadband ignored, larger falls after ``hold_ticks`` low ticks);
- :func:`split_cores`: which cores (the highest-numbered: cpu0 usually carries the host's own
  housekeeping, interrupts and timers);
- :class:`CpusetIsolator` (an enforcer: ``apply()``/``current()``/``restore()``): writes a lower
  task's ``cpuset.cpus`` through the :class:`~rswap_ebpf.host.cgroup.FileApplier`, so every
  write is journalled, backs off from hand edits, and ``--dry-run`` only plans.

cgroup v1 (this host): tasks are not placed in the cpuset hierarchy by default, so a lower task
gets ``<cpuset>/rswap/<name>`` (journalled ``mkdir``; ``cpuset.cpus``/``cpuset.mems`` copied from
its parent before any process joins, as v1 requires) and its processes are moved there
(journalled ``move``).  An adopted cgroup that already has a cpuset directory is used in place.
cgroup v2: the task's own directory's ``cpuset.cpus``, with the cpuset controller switched on in
its ancestors (journalled like cpu/io/memory); cores come back as the parent's effective list,
since a populated v2 cpuset with cores cannot go back to empty (see :meth:`CpusetIsolator.plan`).
"""
from __future__ import annotations

import errno
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from rswap_ebpf import paths
from rswap_ebpf.errors import EnforceError, FeatureMissing
from rswap_ebpf.host.cgroup import (CgroupMounts, FileApplier, TaskCgroup, Write,
                     proc_cgroups)
from rswap_ebpf.host.journal import Journal, remove_cgroup_dir, write_file

log = logging.getLogger(__name__)


def parse_cpulist(text: str) -> frozenset[int]:
    """The kernel's cpu list format (``0-3,6``) as a set.

    >>> sorted(parse_cpulist("0-2,5\\n"))
    [0, 1, 2, 5]
    """
    out: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(out)


def format_cpulist(cpus: Iterable[int]) -> str:
    """The kernel's own spelling of a cpu set, so a re-read compares equal.

    >>> format_cpulist({0, 1, 2, 5, 7, 8})
    '0-2,5,7-8'
    """
    runs: list[list[int]] = []
    for c in sorted(cpus):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def cores_wanted(critical_millicores: float, allowed: int, above_millicores: float) -> int:
    """Cores to keep the lower tiers off: 0 below ``above_millicores`` (no burst forecast), else
    ``ceil(millicores / 1000)``, at least 1 and at most ``allowed - 1`` (never every core).

    >>> [cores_wanted(m, 2, 250) for m in (0, 249, 250, 1000, 1001, 5000)]
    [0, 0, 1, 1, 1, 1]
    >>> [cores_wanted(m, 8, 250) for m in (300, 1001, 2500, 9000)]
    [1, 2, 3, 7]
    >>> cores_wanted(5000, 1, 250)
    0
    """
    if allowed < 2 or critical_millicores < above_millicores or critical_millicores <= 0:
        return 0
    return max(1, min(allowed - 1, math.ceil(critical_millicores / 1000)))


def split_cores(allowed: Iterable[int], isolate: int) -> tuple[frozenset[int], frozenset[int]]:
    """(cores the lower tiers keep, cores left to the critical tier): the highest ``isolate``
    numbers go to the critical tier, never all of them.

    >>> split_cores({0, 1, 2, 3}, 1)
    (frozenset({0, 1, 2}), frozenset({3}))
    >>> split_cores({0, 1}, 5)
    (frozenset({0}), frozenset({1}))
    """
    cores = sorted(allowed)
    n = max(0, min(isolate, len(cores) - 1))
    return frozenset(cores[:len(cores) - n]), frozenset(cores[len(cores) - n:])


@dataclass
class IsolationPolicy:
    """Hysteresis on the number of isolated cores, the quota's rule (swap.policy) in whole cores.

    A rise is taken the tick it is forecast (the burst must find its core free).  A fall is taken
    only when the critical allocation is below the lower level's boundary by more than
    ``deadband`` (so an allocation hovering at a boundary does not flap) for more than
    ``hold_ticks`` ticks in a row.

    >>> p = IsolationPolicy(above_millicores=250, hold_ticks=1, deadband=0.1)
    >>> [p.update(m, 2) for m in (100, 600, 100, 600, 100, 100, 240, 100)]
    [0, 1, 1, 1, 1, 0, 0, 0]
    """

    above_millicores: float = 250.0
    hold_ticks: int = 1
    deadband: float = 0.1
    cores: int = 0
    _low_for: int = field(default=0, repr=False)

    def update(self, critical_millicores: float, allowed: int) -> int:
        """The cores to isolate this tick, given the critical tier's allocation."""
        want = cores_wanted(critical_millicores, allowed, self.above_millicores)
        if want >= self.cores:
            self._low_for = 0
            self.cores = want
            return want
        # Falling: only when below the boundary by the deadband, and for long enough.
        slack = cores_wanted(critical_millicores * (1 + self.deadband), allowed,
                             self.above_millicores)
        if slack >= self.cores:
            self._low_for = 0
            return self.cores
        self._low_for += 1
        if self._low_for > self.hold_ticks:
            self._low_for = 0
            self.cores = want
        return self.cores


class CpusetIsolator:
    """Writes lower-tier tasks' ``cpuset.cpus``; see the module docstring for v1 and v2."""

    def __init__(self, mounts: CgroupMounts, journal: Journal, applier: FileApplier,
                 dry_run: bool = False, enable_controllers=None):
        self.mounts = mounts
        self.journal = journal
        self.applier = applier
        self.dry_run = dry_run
        #: CgroupManager.enable_controllers-like callable (v2: switch cpuset on for a parent)
        self._enable = enable_controllers
        self.version, self.root = cpuset_hierarchy(mounts)
        #: task -> the cpuset directory used for it (v1: rswap's own or an adopted one)
        self.dirs: dict[str, str] = {}
        self._owned: set[str] = set()
        #: v2 tasks left alone: their cgroup's cpuset.cpus is empty (said once)
        self._inheriting: set[str] = set()

    # -- where ------------------------------------------------------------------------------
    def allowed(self) -> frozenset[int]:
        """The cores lower tasks may use at all: the cpuset root's effective cpus."""
        return allowed_cpus(self.version, self.root)

    def cpuset_dir(self, cg: TaskCgroup) -> str:
        """Where ``cg``'s cpuset lives (v1: an adopted cgroup's own directory when it exists)."""
        if self.version == "v2":
            d = cg.dirs.get("unified")
            if d is None:
                raise FeatureMissing("cgroup v2", "not mounted")
            return d
        if not cg.owned:
            adopted = paths.confine(cg.rel, self.root, f"task {cg.name}.cgroup")
            if os.path.isdir(adopted):
                return adopted
        return self._own_dir(cg)

    def _own_dir(self, cg: TaskCgroup) -> str:
        return paths.confine(cg.rel, self.root, f"task {cg.name}")

    # -- enforcer ---------------------------------------------------------------------------
    def plan(self, cg: TaskCgroup, cpus: frozenset[int] | None) -> list[Write]:
        """``cpus`` for ``cg`` (None: all of its parent's again)."""
        d = self.dirs.get(cg.name) or self.cpuset_dir(cg)
        path = os.path.join(d, "cpuset.cpus")
        if self.version == "v2":
            # A populated v2 cpuset that has cores of its own cannot go back to none ("", all of
            # the parent's): the kernel says ENOSPC.  So the cores come back as an explicit list,
            # and an operator's cgroup that inherits (empty) is left alone, as it could not be
            # restored exactly; one rswap made is removed at exit, whatever it holds.
            if not cg.owned and not _read_or_empty(path):
                if cg.name not in self._inheriting:
                    self._inheriting.add(cg.name)
                    log.warning("task %s: %s is empty (the parent's cores); cgroup v2 cannot "
                                "put that back while it holds processes, so core isolation "
                                "leaves this task alone", cg.name, path)
                return []
            parent = _cpus_of(os.path.dirname(d), "cpuset.cpus.effective") or self.allowed()
        else:
            parent = _cpus_of(os.path.dirname(d)) if os.path.isdir(os.path.dirname(d)) \
                else self.allowed()
        want = parent if cpus is None else (cpus & parent)
        if not want:  # an adopted cpuset that shares no core with the plan: leave it alone
            return []
        return [(path, format_cpulist(want))]

    def apply(self, cg: TaskCgroup, cpus: frozenset[int] | None) -> list[Write]:
        """Ready ``cg``'s cpuset (v1: create it and move its processes in) and write ``cpus``."""
        if not self.dry_run:
            self._ready(cg, moving=cpus is not None)
        return self.applier.apply(self.plan(cg, cpus))

    def current(self, cg: TaskCgroup) -> frozenset[int] | None:
        """The cores ``cg``'s cpuset allows now (None: it has none of its own yet)."""
        d = self.dirs.get(cg.name) or self.cpuset_dir(cg)
        try:
            text = _read(os.path.join(d, "cpuset.cpus"))
        except OSError:
            return None
        return parse_cpulist(text) if text else None

    def restore(self, cg: TaskCgroup) -> list[Write]:
        """Give ``cg`` every core back (the journal puts the original bytes back at exit)."""
        if cg.name not in self.dirs:
            return []
        return self.applier.apply(self.plan(cg, None))

    def forget(self, name: str) -> None:
        """``name`` is no longer managed: remove the cpuset directory rswap made for it."""
        d = self.dirs.pop(name, None)
        if d is not None and d in self._owned:
            self._owned.discard(d)
            try:
                remove_cgroup_dir(d)
            except OSError:
                pass  # busy: the journal removes it when rswap stops

    # -- v1 directories and processes ----------------------------------------------------
    def _ready(self, cg: TaskCgroup, moving: bool) -> None:
        d = self.dirs.get(cg.name) or self.cpuset_dir(cg)
        if self.version == "v2":
            if not os.path.exists(os.path.join(d, "cpuset.cpus")) and self._enable is not None:
                self._enable(os.path.dirname(d), ("cpuset",))
            if not os.path.exists(os.path.join(d, "cpuset.cpus")):
                raise FeatureMissing("cgroup v2 cpuset", f"{d} has no cpuset.cpus",
                                     "echo +cpuset > the parent's cgroup.subtree_control")
            self.dirs[cg.name] = d
            return
        if cg.name not in self.dirs:
            if d == self._own_dir(cg):
                self._make(os.path.dirname(d), shared=True)
                self._make(d, shared=False)
                self._owned.add(d)
            self.dirs[cg.name] = d
        if moving and d in self._owned:
            self._move_in(cg, d)

    def _make(self, d: str, shared: bool) -> None:
        """Create a v1 cpuset directory with its parent's cpus and mems, as a process needs
        before it may join.  The two writes are inside a directory the journal says rswap made
        (restore removes it whole), so they need no entries of their own; a directory that
        exists with none (left empty by hand) gets journalled writes."""
        parent = os.path.dirname(d)
        created = False
        if not os.path.isdir(d):
            self.journal.record_mkdir(d, shared=shared)
            try:
                os.mkdir(d, 0o755)
                created = True
            except FileExistsError:
                pass
            except OSError as err:
                raise EnforceError(d, f"cannot create cpuset: {err.strerror}") from err
        for name in ("cpuset.cpus", "cpuset.mems"):
            path = os.path.join(d, name)
            try:
                if _read(path):
                    continue
                value = _read(os.path.join(parent, name))
                if not created:
                    self.journal.record_write(path)
                write_file(path, value)
            except OSError as err:
                raise EnforceError(path, f"cannot initialise: {err.strerror}") from err

    def _move_in(self, cg: TaskCgroup, d: str) -> None:
        """Move the task's processes (v1 moves every thread of each) into cpuset ``d``."""
        procs = os.path.join(d, "cgroup.procs")
        try:
            inside = set(_read(procs).split())
        except OSError as err:
            raise EnforceError(procs, f"cannot read: {err.strerror}") from err
        for pid in cg.pids():
            if str(pid) in inside:
                continue
            origin = _cpuset_of(pid, self.root)
            if origin is None:
                continue  # exited
            self.journal.record_move(pid, os.path.join(origin, "cgroup.procs"))
            try:
                write_file(procs, str(pid))
            except OSError as err:
                if err.errno == errno.ESRCH:
                    continue
                raise EnforceError(d, f"cannot move pid {pid}: {err.strerror}") from err


@dataclass(frozen=True)
class IsolationState:
    """What :class:`CriticalIsolation` decided this tick (for logs, status and tests)."""

    cores: int
    lower_cpus: frozenset[int]
    isolated: frozenset[int]
    writes: tuple[Write, ...] = ()


class CriticalIsolation:
    """The CPU driver's per-tick step: the critical tier's allocation -> lower tiers' cpusets."""

    def __init__(self, isolator: CpusetIsolator, policy: IsolationPolicy):
        self.isolator = isolator
        self.policy = policy
        self.state = IsolationState(0, frozenset(), frozenset())

    def settle(self, critical_millicores: float, lower: Mapping[str, TaskCgroup]) -> IsolationState:
        allowed = self.isolator.allowed()
        cores = self.policy.update(critical_millicores, len(allowed))
        keep, isolated = split_cores(allowed, cores)
        writes: list[Write] = []
        for name in [n for n in self.isolator.dirs if n not in lower]:
            self.isolator.forget(name)
        for name, cg in sorted(lower.items()):
            if not cg.exists():
                continue  # vanished mid-tick: the daemon reaps it next tick
            try:
                if cores:
                    writes += self.isolator.apply(cg, keep)
                else:
                    writes += self.isolator.restore(cg)
            except EnforceError:
                if cg.exists():
                    raise
        self.state = IsolationState(cores, keep, isolated, tuple(writes))
        return self.state


def cpuset_hierarchy(mounts: CgroupMounts) -> tuple[str, str]:
    """("v1"|"v2", root) where lower tiers' cpusets can be written, or FeatureMissing."""
    if mounts.mode == "unified" or ("cpuset" in mounts.v2_controllers() and "cpuset" not in mounts.v1):
        if mounts.unified and "cpuset" in mounts.v2_controllers():
            return "v2", mounts.unified
    elif "cpuset" in mounts.v1:
        return "v1", mounts.v1["cpuset"]
    raise FeatureMissing("cpuset controller", "neither a cgroup v1 cpuset hierarchy nor the "
                         "cgroup2 cpuset controller is available",
                         "mount -t cgroup -o cpuset cpuset /sys/fs/cgroup/cpuset (v1), or make "
                         "the kernel offer cpuset in /sys/fs/cgroup/cgroup.controllers (v2)")


def allowed_cpus(version: str, root: str) -> frozenset[int]:
    """The effective cpus of cpuset hierarchy ``root`` (this process's affinity if unreadable)."""
    name = "cpuset.effective_cpus" if version == "v1" else "cpuset.cpus.effective"
    try:
        cpus = parse_cpulist(_read(os.path.join(root, name)))
    except (OSError, ValueError):
        cpus = frozenset()
    return cpus or frozenset(os.sched_getaffinity(0))


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _cpus_of(d: str, name: str = "cpuset.cpus") -> frozenset[int]:
    try:
        return parse_cpulist(_read(os.path.join(d, name)))
    except (OSError, ValueError):
        return frozenset()


def _read_or_empty(path: str) -> str:
    try:
        return _read(path)
    except OSError:
        return ""


def _cpuset_of(pid: int, root: str) -> str | None:
    """``pid``'s v1 cpuset directory under ``root``; None once it has exited."""
    for _, ctrls, rel in proc_cgroups(pid):
        if "cpuset" in ctrls.split(","):
            return os.path.join(root, rel.lstrip("/"))
    return None
