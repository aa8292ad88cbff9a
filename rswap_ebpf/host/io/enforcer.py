"""Block IO limits per task and device: cgroup v2 ``io.max`` or v1 ``blkio.throttle.*_device``.

These files hold one line per device, so a plain "write the file back" journal entry cannot undo
them (writing the old text does not remove a line rswap added).  The enforcer journals each
``(file, device)`` pair it touches as a ``custom`` entry of kind ``blkio`` holding that device's
original limits; restore writes them back for that device only.

``apply()`` re-reads the device's line first: when it is neither what rswap last wrote nor the
original, an administrator changed it and rswap leaves it alone (like bpftune).

An IOPS allocation limits reads and writes separately (the kernel has no combined knob): a task
allocated N IO/s may issue N reads *and* N writes per second.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass

from rswap_ebpf.errors import ConfigError, EnforceError, FeatureMissing
from rswap_ebpf.host.cgroup import CgroupMounts, TaskCgroup, Write
from rswap_ebpf.host.journal import Journal, register_undo, write_file

log = logging.getLogger(__name__)

V1_FILES = {"riops": "blkio.throttle.read_iops_device", "wiops": "blkio.throttle.write_iops_device",
            "rbps": "blkio.throttle.read_bps_device", "wbps": "blkio.throttle.write_bps_device"}
V2_KEYS = ("rbps", "wbps", "riops", "wiops")
JOURNAL_KIND = "blkio"
#: Overridable like the roots in paths.py ($RSWAP_SYSFS_ROOT), for tests with a fake tree.
SYSFS_ROOT = "/sys"


@dataclass(frozen=True)
class BlockDevice:
    major: int
    minor: int
    path: str = ""

    @property
    def majmin(self) -> str:
        return f"{self.major}:{self.minor}"


def resolve_device(name: object, field_name: str = "io.device") -> BlockDevice:
    """``/dev/loop3``, ``loop3`` or ``7:3`` -> a whole-disk :class:`BlockDevice`, or ConfigError."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ConfigError(field_name, f"{name!r} is not a block device name")
    sysdev = os.path.join(os.environ.get("RSWAP_SYSFS_ROOT") or SYSFS_ROOT, "dev", "block")
    if ":" in name and not name.startswith("/"):
        try:
            major, minor = (int(x) for x in name.split(":"))
        except ValueError:
            raise ConfigError(field_name, f"{name!r} is not MAJ:MIN") from None
        dev = BlockDevice(major, minor, name)
    else:
        path = name if name.startswith("/") else os.path.join("/dev", name)
        try:
            st = os.stat(path)
        except OSError as err:
            raise ConfigError(field_name, f"{path}: {err.strerror}") from None
        if not stat.S_ISBLK(st.st_mode):
            raise ConfigError(field_name, f"{path} is not a block device")
        dev = BlockDevice(os.major(st.st_rdev), os.minor(st.st_rdev), path)
    node = os.path.join(sysdev, dev.majmin)
    if not os.path.exists(node):
        raise ConfigError(field_name, f"no block device {dev.majmin} ({name}) on this host")
    if os.path.exists(os.path.join(node, "partition")):
        raise ConfigError(field_name, f"{name} is a partition; IO limits apply to whole disks")
    if os.path.exists(os.path.join(node, "loop")) and not os.path.exists(
            os.path.join(node, "loop", "backing_file")):
        raise ConfigError(field_name, f"{name} is a loop device with no backing file")
    return dev


@dataclass(frozen=True)
class IoLimit:
    """Per-device limits; None means unlimited ("max" in v2, no rule in v1)."""

    riops: int | None = None
    wiops: int | None = None
    rbps: int | None = None
    wbps: int | None = None

    @classmethod
    def iops(cls, n: int) -> IoLimit:
        n = max(1, int(n))  # 0 would mean "no limit" to the kernel
        return cls(riops=n, wiops=n)


class IoWriter:
    version = ""

    def plan(self, cg: TaskCgroup, dev: BlockDevice, limit: IoLimit) -> list[Write]:
        raise NotImplementedError

    def read(self, path: str, dev: BlockDevice) -> str:
        """The device's setting in ``path`` as rswap writes it (restorable text)."""
        raise NotImplementedError

    def current(self, cg: TaskCgroup, dev: BlockDevice) -> IoLimit:
        raise NotImplementedError

    def serviced(self, cg: TaskCgroup, dev: BlockDevice) -> int | None:
        """Reads + writes the kernel has counted for the cgroup on ``dev`` so far (None: unknown).

        The kernel charges each bio to its cgroup whoever submits it; a BPF program at
        block_rq_issue cannot, for a throttled bio is issued later from a kworker.
        """
        raise NotImplementedError


class CgroupV1IoWriter(IoWriter):
    """``blkio.throttle.{read,write}_{iops,bps}_device``: "MAJ:MIN N", N = 0 removes the rule."""

    version = "v1"

    def _dir(self, cg: TaskCgroup) -> str:
        try:
            return cg.dirs["blkio"]
        except KeyError:
            raise FeatureMissing("cgroup v1 blkio controller", "not mounted") from None

    def plan(self, cg: TaskCgroup, dev: BlockDevice, limit: IoLimit) -> list[Write]:
        d = self._dir(cg)
        out = []
        for key, fname in V1_FILES.items():
            value = getattr(limit, key)
            out.append((os.path.join(d, fname), f"{dev.majmin} {value if value else 0}"))
        return out

    def read(self, path: str, dev: BlockDevice) -> str:
        return f"{dev.majmin} {_v1_value(path, dev) or 0}"

    def current(self, cg: TaskCgroup, dev: BlockDevice) -> IoLimit:
        d = self._dir(cg)
        return IoLimit(**{k: _v1_value(os.path.join(d, f), dev) for k, f in V1_FILES.items()})

    def serviced(self, cg: TaskCgroup, dev: BlockDevice) -> int | None:
        """``blkio.throttle.io_serviced``: "MAJ:MIN Read N" / "MAJ:MIN Write N" lines."""
        try:
            with open(os.path.join(self._dir(cg), "blkio.throttle.io_serviced")) as f:
                lines = [line.split() for line in f]
        except OSError:
            return None
        return sum(int(p[2]) for p in lines if len(p) == 3 and p[0] == dev.majmin
                   and p[1] in ("Read", "Write"))


class CgroupV2IoWriter(IoWriter):
    """``io.max``: "MAJ:MIN rbps=max wbps=max riops=N wiops=N"."""

    version = "v2"

    def _dir(self, cg: TaskCgroup) -> str:
        d = cg.dirs.get("unified")
        if d is None:
            raise FeatureMissing("cgroup v2", "not mounted")
        return d

    def plan(self, cg: TaskCgroup, dev: BlockDevice, limit: IoLimit) -> list[Write]:
        vals = " ".join(f"{k}={getattr(limit, k) or 'max'}" for k in V2_KEYS)
        return [(os.path.join(self._dir(cg), "io.max"), f"{dev.majmin} {vals}")]

    def read(self, path: str, dev: BlockDevice) -> str:
        got = _v2_values(path, dev)
        return f"{dev.majmin} " + " ".join(f"{k}={got.get(k) or 'max'}" for k in V2_KEYS)

    def current(self, cg: TaskCgroup, dev: BlockDevice) -> IoLimit:
        got = _v2_values(os.path.join(self._dir(cg), "io.max"), dev)
        return IoLimit(**{k: got.get(k) for k in V2_KEYS})

    def serviced(self, cg: TaskCgroup, dev: BlockDevice) -> int | None:
        """``io.stat``: "MAJ:MIN rbytes=.. wbytes=.. rios=N wios=N ..." (no line: nothing yet)."""
        try:
            got = _v2_values(os.path.join(self._dir(cg), "io.stat"), dev)
        except (OSError, ValueError):
            return None
        return (got.get("rios") or 0) + (got.get("wios") or 0)


def _v1_value(path: str, dev: BlockDevice) -> int | None:
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 2 and parts[0] == dev.majmin:
                return int(parts[1]) or None
    return None


def _v2_values(path: str, dev: BlockDevice) -> dict[str, int | None]:
    with open(path) as f:
        for line in f:
            parts = line.split()
            if parts and parts[0] == dev.majmin:
                out: dict[str, int | None] = {}
                for kv in parts[1:]:
                    k, _, v = kv.partition("=")
                    out[k] = None if v == "max" else int(v)
                return out
    return {}


def io_writer(mounts: CgroupMounts) -> IoWriter:
    """v2 ``io.max`` where the io controller is enabled there, else v1 blkio throttling."""
    if "io" in mounts.v2_controllers() and "blkio" not in mounts.v1:
        return CgroupV2IoWriter()
    if "blkio" in mounts.v1:
        return CgroupV1IoWriter()
    raise FeatureMissing("cgroup io controller", "neither cgroup v2 io nor v1 blkio is available",
                         "enable it: echo +io > /sys/fs/cgroup/cgroup.subtree_control")


class IoEnforcer:
    """apply()/current()/restore() for one task's limits on one device, journalled per line."""

    def __init__(self, journal: Journal, writer: IoWriter, dry_run: bool = False):
        self.journal = journal
        self.writer = writer
        self.dry_run = dry_run
        self.planned: list[Write] = []
        self.overridden: set[tuple[str, str]] = set()
        self._last: dict[tuple[str, str], str] = {}
        self._journalled: set[tuple[str, str]] = set()

    def apply(self, cg: TaskCgroup, dev: BlockDevice, limit: IoLimit) -> list[Write]:
        done: list[Write] = []
        for path, value in self.writer.plan(cg, dev, limit):
            key = (path, dev.majmin)
            if self.dry_run:
                self.planned.append((path, value))
                continue
            if key in self.overridden:
                continue
            try:
                now = self.writer.read(path, dev)
            except OSError as err:
                raise EnforceError(path, f"cannot read: {err.strerror}") from err
            last = self._last.get(key)
            if last is not None and now != last:
                log.warning("%s %s was changed by hand (%r, rswap wrote %r): leaving it alone",
                            path, dev.majmin, now, last)
                self.overridden.add(key)
                continue
            if now == value:
                self._last[key] = value
                continue
            if key not in self._journalled:
                self.journal.record_custom(JOURNAL_KIND, {"path": path, "original": now})
                self._journalled.add(key)
            try:
                write_file(path, value)
            except OSError as err:
                raise EnforceError(path, f"cannot write {value!r}: {err.strerror}") from err
            self._last[key] = self.writer.read(path, dev)
            done.append((path, value))
        return done

    def current(self, cg: TaskCgroup, dev: BlockDevice) -> IoLimit:
        return self.writer.current(cg, dev)

    def restore(self) -> None:
        """Undo this enforcer's entries now (the daemon's journal restore does the same)."""
        for entry in reversed(self.journal.entries()):
            if entry.get("op") == "custom" and entry.get("kind") == JOURNAL_KIND:
                _undo(entry["data"])
        self._last.clear()
        self._journalled.clear()


def _undo(data: dict) -> None:
    path, original = data["path"], data["original"]
    if not os.path.exists(path):
        return  # the cgroup is gone, and its limits with it
    try:
        write_file(path, original)
    except OSError as err:
        if err.errno == errno.ENODEV:  # the device is gone, and its rule with it
            return
        raise


register_undo(JOURNAL_KIND, _undo)
