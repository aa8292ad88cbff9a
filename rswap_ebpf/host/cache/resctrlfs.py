"""The resctrl filesystem as rswap reads it: the file seam, ``info/``, the schemata syntax, the mount.

Follows the kernel's interface (Documentation/arch/x86/resctrl.rst):

- ``info/L3/{cbm_mask,min_cbm_bits,num_closids,shareable_bits[,sparse_masks]}`` (with CDP:
  ``info/L3CODE`` and ``info/L3DATA`` instead) and ``info/MB/{bandwidth_gran,min_bandwidth,
  num_closids}`` bound what may be written;
- ``info/last_cmd_status`` holds the last command's error text, or ``ok``;
- one control group = one directory with ``schemata``, ``tasks`` and ``mon_data/``.

The file operations go through a :class:`ResctrlFS`; :class:`OsResctrlFS` is the kernel's files,
and the tests substitute a fake tree that validates writes as the kernel does.
"""
from __future__ import annotations

import logging
import math
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from rswap_ebpf import paths
from rswap_ebpf.errors import EnforceError, FeatureMissing
from rswap_ebpf.host.journal import Journal, allow_root

log = logging.getLogger(__name__)

JOURNAL_KIND = "resctrl"
MB_MAX_PERCENT = 100
MBA_MAX_MBPS = 2**32 - 1   # the default MB value under mba_MBps (the kernel's MBA_MAX_MBPS)
#: ``ResctrlInfo.mb_unit`` values: what a number on an ``MB:`` line means on this host
MB_PERCENT, MB_AMD_EIGHTH_GBPS, MB_MIBPS = "percent", "1/8 GB/s (AMD)", "MiB/s (mba_MBps)"


# -- the file seam ----------------------------------------------------------------------------

class ResctrlFS:
    """The file operations the enforcer needs: one method per system call it makes."""

    def read(self, path: str) -> str:
        with open(path) as f:
            return f.read()

    def write(self, path: str, text: str) -> None:
        """One write(2), as resctrl files expect (a schemata or a tid per write)."""
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    def mkdir(self, path: str) -> None:
        os.mkdir(path)

    def rmdir(self, path: str) -> None:
        os.rmdir(path)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)


class OsResctrlFS(ResctrlFS):
    """The kernel's resctrl files."""


_FILESYSTEMS: dict[str, ResctrlFS] = {}


def register_fs(root: str, fs: ResctrlFS | None) -> None:
    """Route operations below ``root`` through ``fs`` (a fake tree in tests); None removes it.

    The journal's undo handler runs with nothing but the journalled data, so this is how it finds
    the same seam the enforcer used.
    """
    root = os.path.realpath(root)
    if fs is None:
        _FILESYSTEMS.pop(root, None)
    else:
        _FILESYSTEMS[root] = fs
        allow_root(root)  # the journal's restore may act below it


def fs_for(root: str) -> ResctrlFS:
    return _FILESYSTEMS.get(os.path.realpath(root)) or OsResctrlFS()


# -- what the hardware allows ---------------------------------------------------------------

@dataclass(frozen=True)
class ResctrlInfo:
    """The bounds from ``info/``; ``has_l3`` / ``has_mb`` say which resources the host has."""

    root: str
    num_closids: int
    cbm_mask: int = 0
    min_cbm_bits: int = 1
    shareable_bits: int = 0
    sparse_masks: bool = False
    l3_domains: tuple[int, ...] = ()
    bw_gran: int = 10
    min_bw: int = 10
    mb_domains: tuple[int, ...] = ()
    mon_features: tuple[str, ...] = ()
    mb_unit: str = MB_PERCENT
    mb_max: int = MB_MAX_PERCENT    # the largest MB value the kernel accepts (unthrottled)
    #: mounted with ``-o cdp``: L3 is two resources, ``L3CODE`` and ``L3DATA``, each with its own
    #: mask per group and half the CLOSIDs; rswap gives a group the same ways for both
    cdp: bool = False
    num_rmids: int = 0              # 0: no monitoring, no RMID per group needed

    @property
    def l3_names(self) -> tuple[str, ...]:
        """The schemata resource names the L3 masks are written under."""
        return ("L3CODE", "L3DATA") if self.cdp else ("L3",)

    @property
    def has_l3(self) -> bool:
        return bool(self.cbm_mask)

    @property
    def has_mb(self) -> bool:
        return bool(self.mb_domains)

    @property
    def cbm_len(self) -> int:
        return self.cbm_mask.bit_length()

    @property
    def ways(self) -> int:
        return bin(self.cbm_mask).count("1")

    def mb_value(self, percent: int, peak_bytes_per_s: float | None = None) -> int:
        """The ``MB`` value for ``percent`` of a domain, as the kernel keeps it: within
        [min_bw, max], rounded up to the granularity (``bw_validate()``: ``roundup(bw, bw_gran)``).

        On AMD and under mba_MBps the value is a rate: ``percent`` of ``peak_bytes_per_s`` (on AMD,
        without a peak, of the hardware maximum); 100 % is the unthrottled maximum.
        """
        gran = max(1, self.bw_gran)
        if self.mb_unit == MB_PERCENT:
            pct = min(MB_MAX_PERCENT, max(self.min_bw, int(percent)))
            return min(MB_MAX_PERCENT, -(-pct // gran) * gran)
        if percent >= MB_MAX_PERCENT:
            return self.mb_max
        if self.mb_unit == MB_AMD_EIGHTH_GBPS:
            raw = (percent / 100 * peak_bytes_per_s * 8 / 1e9 if peak_bytes_per_s
                   else percent / 100 * self.mb_max)
        else:
            if not peak_bytes_per_s:
                raise EnforceError(self.root, "resctrl is mounted with mba_MBps (MB values are "
                                   "MiB/s): set [resources.membw] peak_bytes_per_s")
            # The software controller takes any rate: no range check, no rounding.
            return min(self.mb_max, max(1, math.ceil(percent / 100 * peak_bytes_per_s / 2**20)))
        value = -(-math.ceil(raw) // gran) * gran
        return min(self.mb_max, max(self.min_bw, 1, value))


def parse_schemata(text: str) -> dict[str, dict[int, str]]:
    """``"L3:0=fff;1=fff\\nMB:0=100"`` -> ``{"L3": {0: "fff", 1: "fff"}, "MB": {0: "100"}}``."""
    out: dict[str, dict[int, str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        name, _, doms = line.partition(":")
        entries = out.setdefault(name.strip(), {})
        for item in doms.split(";"):
            if not item.strip():
                continue
            dom, _, value = item.partition("=")
            entries[int(dom.strip())] = value.strip()
    return out


def read_info(root: str | None = None, fs: ResctrlFS | None = None) -> ResctrlInfo:
    """Read ``info/`` and the default group's schemata (for the domain ids) under ``root``."""
    root = root or paths.root("RESCTRL_ROOT")
    fs = fs or fs_for(root)

    def value(*parts: str, default: str | None = None) -> str:
        path = os.path.join(root, "info", *parts)
        if not fs.exists(path):
            if default is None:
                raise FeatureMissing("resctrl", f"{path} is missing: not a resctrl mount?")
            return default
        return fs.read(path).strip()

    try:
        schemata = parse_schemata(fs.read(os.path.join(root, "schemata")))
    except OSError as err:
        raise FeatureMissing("resctrl", f"cannot read {root}/schemata: {err.strerror}",
                             "mount -t resctrl resctrl /sys/fs/resctrl") from None
    closids = []
    kw: dict = {}
    # With CDP (mount -o cdp) info/ has L3CODE and L3DATA and no L3; both show the halved
    # num_closids and the same cbm_mask (resctrl.rst, "Cache resource ... CDP").
    l3 = next((n for n in ("L3", "L3CODE") if fs.isdir(os.path.join(root, "info", n))), None)
    if l3 is not None:
        kw.update(cbm_mask=int(value(l3, "cbm_mask"), 16),
                  min_cbm_bits=int(value(l3, "min_cbm_bits")),
                  shareable_bits=int(value(l3, "shareable_bits", default="0"), 16),
                  sparse_masks=value(l3, "sparse_masks", default="0") == "1",
                  l3_domains=tuple(sorted(schemata.get(l3, {}))), cdp=l3 == "L3CODE")
        closids.append(int(value(l3, "num_closids")))
    if fs.isdir(os.path.join(root, "info", "MB")):
        kw.update(bw_gran=int(value("MB", "bandwidth_gran")),
                  min_bw=int(value("MB", "min_bandwidth")),
                  mb_domains=tuple(sorted(schemata.get("MB", {}))))
        kw.update(_mb_unit(root, schemata.get("MB", {}), kw["min_bw"],
                           value("MB", "delay_linear", default="1") == "1"))
        closids.append(int(value("MB", "num_closids")))
    if fs.isdir(os.path.join(root, "info", "L3_MON")):
        kw["mon_features"] = tuple(value("L3_MON", "mon_features", default="").split())
        kw["num_rmids"] = int(value("L3_MON", "num_rmids", default="0"))
    if not closids:
        raise FeatureMissing("resctrl allocation", f"{root}/info has neither L3 (nor L3CODE/"
                             "L3DATA) nor MB",
                             "the CPU has no cache or bandwidth allocation (CAT/MBA)")
    # The kernel offers the smallest num_closids of the enabled resources.
    return ResctrlInfo(root=root, num_closids=min(closids), **kw)


def _mb_unit(root: str, default_mb: Mapping[int, str], min_bw: int, delay_linear: bool) -> dict:
    """What ``MB`` values mean here.  The kernel keeps the default group at the largest value
    (100, AMD's max_bw, or MBA_MAX_MBPS) unless someone lowered it; AMD also shows
    ``min_bandwidth`` 0 and ``delay_linear`` 0, and mba_MBps is a mount option."""
    values = [int(v) for v in default_mb.values() if v.strip().isdigit()]
    top = max(values, default=MB_MAX_PERCENT)
    if top == MBA_MAX_MBPS or _mount_has_option(root, "mba_MBps"):
        return {"mb_unit": MB_MIBPS, "mb_max": MBA_MAX_MBPS}
    if top > MB_MAX_PERCENT or (min_bw == 0 and not delay_linear):
        return {"mb_unit": MB_AMD_EIGHTH_GBPS, "mb_max": top}
    return {}


def _resctrl_mount_options(root: str) -> list[str] | None:
    """The options of the kernel's resctrl mount at ``root``, or None where ``root`` is not one."""
    try:
        with open(os.path.join(paths.root("PROCFS_ROOT"), "mounts")) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 4 and parts[2] == "resctrl" and \
                        os.path.realpath(parts[1]) == os.path.realpath(root):
                    return parts[3].split(",")
    except OSError:
        pass
    return None


def _mount_has_option(root: str, option: str) -> bool:
    return option in (_resctrl_mount_options(root) or [])


def ensure_mounted(journal: Journal | None = None, root: str | None = None) -> str:
    """The resctrl root, mounting it (journalled, so restore unmounts it) when the kernel has it."""
    root = root or paths.root("RESCTRL_ROOT")
    fs = fs_for(root)
    if fs.exists(os.path.join(root, "schemata")):
        return root
    try:
        with open(os.path.join(paths.root("PROCFS_ROOT"), "filesystems")) as f:
            known = any(line.split()[-1] == "resctrl" for line in f if line.strip())
    except OSError:
        known = False
    if not known:
        raise FeatureMissing("resctrl", "/proc/filesystems does not list resctrl (no Intel RDT / "
                             "AMD PQoS, or a kernel without CONFIG_X86_CPU_RESCTRL)",
                             "needs RDT-capable hardware and a kernel built with resctrl")
    if journal is not None:
        journal.record_custom(JOURNAL_KIND, {"action": "mount", "root": root})
    proc = subprocess.run(["mount", "-t", "resctrl", "resctrl", root], capture_output=True, text=True)
    if proc.returncode != 0:
        raise FeatureMissing("resctrl", f"mount -t resctrl resctrl {root} failed: "
                             f"{proc.stderr.strip() or proc.returncode}")
    return root

