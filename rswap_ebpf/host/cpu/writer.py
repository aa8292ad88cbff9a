"""The writers that limit a task's CPU: cgroup v1 ``cpu.cfs_*``/``cpu.shares`` or v2
``cpu.max``/``cpu.weight``, clamped to the kernel's bounds, built as ``(path, value)`` pairs."""
from __future__ import annotations

import os
from dataclasses import dataclass

from rswap_ebpf.errors import FeatureMissing
from rswap_ebpf.host.cgroup import CgroupMounts, TaskCgroup, Write, _read

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
