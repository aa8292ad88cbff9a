"""resctrl: last-level cache ways (CAT / AMD L3 QoS) and memory bandwidth (MBA) per task.

Follows the kernel's interface (Documentation/arch/x86/resctrl.rst):

- ``info/L3/{cbm_mask,min_cbm_bits,num_closids,shareable_bits[,sparse_masks]}`` and
  ``info/MB/{bandwidth_gran,min_bandwidth,num_closids}`` bound what may be written;
- one control group = one directory with ``schemata`` (``L3:<id>=<hexmask>;...`` and
  ``MB:<id>=<percent>;...``), ``tasks`` (one thread id per write) and ``mon_data/``;
- the root directory is the default group (CLOSID 0) every other thread is in.

Mode: one control group per task (``rswap-<task>``) when ``num_closids - 1`` (CLOSID 0 is the
default group) covers every task; otherwise one group per priority tier (``rswap-critical``,
``rswap-normal``, ``rswap-batch``), each tier given the sum of its tasks' ways and percent.  The
mode is chosen once in :meth:`ResctrlEnforcer.open` and reported in ``mode``.

Memory-bandwidth units (:attr:`ResctrlInfo.mb_unit`): on AMD an ``MB`` value is an absolute rate
in multiples of 1/8 GB/s up to the hardware's maximum (``min_bandwidth`` 0, ``bandwidth_gran`` 1,
``delay_linear`` 0, the default group holding the maximum, e.g. 2048 = 256 GB/s); under
``-o mba_MBps`` (the MBA software controller) it is MiB/s, default 4294967295.  There ``percent``
is of ``[resources.membw] peak_bytes_per_s`` (required for mba_MBps; on AMD without it, of the
hardware maximum) and the same rate is what MBM senses: one unit both ways.  On Intel without
mba_MBps an ``MB`` value is a *throttle level* (``min_bandwidth``..100, rounded up to
``bandwidth_gran``): the delay the core inserts, not a share of bandwidth (resctrl.rst: the same
level gives different bandwidth with different thread counts and access patterns).  ``percent``
there is passed through as that level; the membw driver does not write its allocation as a level
but steers the level per group from what MBM measures (``levels=``), as the kernel's software
controller does under mba_MBps.  100 % writes the unthrottled default everywhere.

Cache layout: each group gets one contiguous mask (the kernel rejects non-contiguous ones unless
``sparse_masks`` says 1) of as many ways as it is allocated.  Critical groups are packed from bit
0 upwards, then normal; batch groups are packed from the top bit downwards, so a change to a
batch allocation never moves a critical mask.  A group allocated fewer ways than
``min_cbm_bits`` is given the unallocated ways (or the top ``min_cbm_bits``, overlapping the
lowest-priority group) because the kernel refuses a smaller mask.  Masks of a group's own are laid out
only in the longest run of ways outside ``shareable_bits`` (ways other agents may fill); under CDP
the same mask is written to ``L3CODE`` and ``L3DATA``.  With ``isolate_default`` the
default group is narrowed the same way, so the ordinary processes of the host stop evicting what
critical tasks keep in their exclusive ways.

Every change is journalled before it is made (``custom`` entries of kind ``resctrl``): groups
created, each group's original ``schemata`` text, and each thread's original group; restore puts
back the original schemata text byte for byte, the threads where they were, and removes the groups.

The file operations go through a :class:`ResctrlFS`; :class:`OsResctrlFS` is the kernel's files,
and the tests substitute a fake tree that validates writes as the kernel does.
"""
from __future__ import annotations

import errno
import logging
import os
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from rswap_ebpf import paths
from rswap_ebpf.errors import EnforceError, FeatureMissing, RswapError
from rswap_ebpf.host.cache.masks import check_mask, contiguous_mask, layout_masks  # noqa: F401
from rswap_ebpf.host.cache.resctrlfs import (  # noqa: F401  (re-exported: one import for users)
    JOURNAL_KIND, MB_AMD_EIGHTH_GBPS, MB_MAX_PERCENT, MB_MIBPS, MB_PERCENT, MBA_MAX_MBPS,
    OsResctrlFS, ResctrlFS, ResctrlInfo, _mount_has_option, _resctrl_mount_options,
    ensure_mounted, fs_for, parse_schemata, read_info, register_fs)
from rswap_ebpf.host.journal import Journal, register_undo

log = logging.getLogger(__name__)

GROUP_PREFIX = "rswap-"
TIERS = ("critical", "normal", "batch")
#: how long open() waits for RMIDs in limbo (EBUSY from mkdir) to be freed, and how often it asks
LIMBO_WAIT_S = 5.0
LIMBO_RETRY_S = 0.5


# -- the enforcer -----------------------------------------------------------------------------

@dataclass
class _Group:
    name: str
    tier: str
    path: str
    created: bool
    members: set[int] = field(default_factory=set)  # tids rswap placed here


class ResctrlEnforcer:
    """``apply()`` ways and percent per task, ``current()`` schemata, ``restore()`` the host."""

    def __init__(self, journal: Journal, root: str | None = None, fs: ResctrlFS | None = None,
                 isolate_default: bool = True, dry_run: bool = False):
        self.journal = journal
        self.root = root or paths.root("RESCTRL_ROOT")
        self.fs = fs or fs_for(self.root)
        self.isolate_default = isolate_default
        self.dry_run = dry_run
        self.info: ResctrlInfo | None = None
        self.mode = ""
        self.groups: dict[str, _Group] = {}  # group name -> group
        self.group_of_task: dict[str, str] = {}
        self.ways: dict[str, int] = {}
        self.percent: dict[str, int] = {}
        #: group name -> MBA throttle level per MB domain id, overriding ``percent`` (Intel
        #: percent mode): an MB value applies per domain, so each domain has its own
        self.levels: dict[str, dict[int, int]] = {}
        self._journalled_schemata: set[str] = set()
        self._last_written: dict[str, str] = {}
        self._kernel_mount: bool | None = None  # is self.root the kernel's resctrl mount?
        #: what 100 % of a domain moves, for hosts whose MB values are rates (AMD, mba_MBps)
        self.mb_peak_bytes_per_s: float | None = None
        self.limbo_wait_s = LIMBO_WAIT_S
        self._sleep = time.sleep

    # -- life cycle ------------------------------------------------------------------------
    def open(self, tasks: Mapping[str, str], mount: bool = True) -> str:
        """Create the groups for ``tasks`` (name -> tier); return the mode chosen."""
        if mount and not self.dry_run:
            ensure_mounted(self.journal, self.root)
        self.info = read_info(self.root, self.fs)
        per_task = len(tasks) <= self.info.num_closids - 1
        self.mode = "per-task" if per_task else "per-tier"
        if not per_task:
            log.warning("resctrl: %d tasks but %d CLOSIDs (one is the default group): one group "
                        "per priority tier", len(tasks), self.info.num_closids)
        for task, tier in tasks.items():
            tier = tier if tier in TIERS else "normal"
            gname = GROUP_PREFIX + (task if per_task else tier)
            self.group_of_task[task] = gname
            if gname not in self.groups:
                self.groups[gname] = _Group(gname, tier, os.path.join(self.root, gname), False)
        needed = len(self.groups)
        if needed > self.info.num_closids - 1:
            raise FeatureMissing("resctrl CLOSIDs", f"{needed} groups needed, the hardware has "
                                 f"{self.info.num_closids - 1} besides the default group")
        if not self.dry_run:
            for g in self.groups.values():
                self._create(g)
        return self.mode

    def _create(self, g: _Group) -> None:
        if self.fs.isdir(g.path):
            # A group left by a crash was removed by restore; one that exists now is an admin's.
            raise EnforceError(g.path, "a resctrl group of this name already exists; "
                               "remove it or run rswap restore")
        self.journal.record_custom(JOURNAL_KIND, {"action": "mkdir", "root": self.root,
                                                  "group": g.name})
        deadline = time.monotonic() + self.limbo_wait_s
        while True:
            try:
                self.fs.mkdir(g.path)
                break
            except OSError as err:
                why = self._refusal(err)
                if err.errno == errno.EBUSY and time.monotonic() < deadline:
                    # No free RMID, but some are in limbo: freed, and still tagging cache lines
                    # above max_threshold_occupancy; the kernel frees them as the lines age out.
                    log.info("resctrl: %s: RMIDs in limbo, retrying", g.name)
                    self._sleep(LIMBO_RETRY_S)
                    continue
                if err.errno == errno.EBUSY:
                    raise FeatureMissing("resctrl RMIDs", f"no free RMID for {g.name}: every "
                                         f"unused one is in limbo ({why}) after "
                                         f"{self.limbo_wait_s:g} s",
                                         "retry later (the kernel frees limbo RMIDs as their "
                                         "cache lines age out), or raise info/L3_MON/"
                                         "max_threshold_occupancy") from err
                if err.errno == errno.ENOSPC:
                    what = "RMID" if "RMID" in why else "CLOSID"
                    raise FeatureMissing(f"resctrl {what}s", f"no free {what} for {g.name}: "
                                         f"{why}", "fewer tasks (per-tier mode needs 3 groups)"
                                         if what == "CLOSID" else "fewer resctrl groups on this "
                                         "host (each control and monitor group holds one RMID)"
                                         ) from err
                raise EnforceError(g.path, f"cannot create: {why}") from err
        g.created = True

    # -- planning --------------------------------------------------------------------------
    def _group_schemata(self, ways: Mapping[str, int], percent: Mapping[str, int],
                        levels: Mapping[str, Mapping[int, int]] | None = None
                        ) -> dict[str, str]:
        """Group path -> schemata text to write (only the resources rswap was given)."""
        info = self._need_info()
        tiers = {g.name: g.tier for g in self.groups.values()}
        out: dict[str, list[str]] = {}
        if info.has_l3 and ways:
            gw: dict[str, int] = {g: 0 for g in self.groups}
            for task, w in ways.items():
                gw[self.group_of_task[task]] += int(w)
            default = "" if self.isolate_default else None
            masks = layout_masks(info, gw, tiers, default_group=default)
            for g, mask in masks.items():
                check_mask(info, mask)
                for name in info.l3_names:   # under CDP the same ways for code and data
                    line = f"{name}:" + ";".join(f"{d}={mask:x}" for d in info.l3_domains)
                    out.setdefault(g, []).append(line)
        levels = levels or {}
        if info.has_mb and (percent or levels):
            gp: dict[str, int] = {g: 0 for g in self.groups}
            for task, p in percent.items():
                gp[self.group_of_task[task]] += int(p)
            for g, p in gp.items():
                if g in levels:
                    if info.mb_unit != MB_PERCENT:
                        raise RswapError("resctrl: throttle levels are Intel MBA's unit; this "
                                         f"host's MB values are {info.mb_unit}")
                    per = {d: info.mb_value(levels[g].get(d, MB_MAX_PERCENT))
                           for d in info.mb_domains}
                elif not percent:
                    continue
                else:
                    v = info.mb_value(p, self.mb_peak_bytes_per_s)
                    per = {d: v for d in info.mb_domains}
                out.setdefault(g, []).append("MB:" + ";".join(f"{d}={v}" for d, v in per.items()))
        return {(self.root if g == "" else self.groups[g].path): "\n".join(lines) + "\n"
                for g, lines in out.items()}

    def plan(self, ways: Mapping[str, int] | None = None,
             percent: Mapping[str, int] | None = None,
             levels: Mapping[str, Mapping[int, int]] | None = None) -> list[tuple[str, str]]:
        """``(schemata path, text)`` pairs for these allocations (unchanged groups left out).

        ``levels``: group name -> MB domain id -> MBA throttle level (Intel percent mode only;
        a domain left out is unthrottled), instead of the group's ``percent``."""
        self._check_tasks(ways or {}, percent or {})
        for g in levels or {}:
            if g not in self.groups:
                raise RswapError(f"resctrl: group {g!r} was not created by open()")
        w = {**self.ways, **(ways or {})}
        p = {**self.percent, **(percent or {})}
        lv = {**self.levels, **{g: dict(v) for g, v in (levels or {}).items()}}
        writes = []
        for gpath, text in self._group_schemata(w, p, lv).items():
            path = os.path.join(gpath, "schemata")
            if self._last_written.get(path) != text:
                writes.append((path, text))
        # Shrinking groups first, so no two exclusive masks overlap in between writes.
        return sorted(writes, key=lambda pv: self._mask_bits(pv[1]) - self._mask_bits(
            self._last_written.get(pv[0]) or self._read_or_empty(pv[0])))

    def _read_or_empty(self, path: str) -> str:
        try:
            return self.fs.read(path)
        except OSError:
            return ""

    @staticmethod
    def _mask_bits(text: str) -> int:
        for name, doms in parse_schemata(text).items():
            if name in ("L3", "L3CODE", "L3DATA") and doms:
                return bin(int(next(iter(doms.values())), 16)).count("1")
        return 0

    def _check_tasks(self, *maps: Mapping[str, int]) -> None:
        for m in maps:
            for task in m:
                if task not in self.group_of_task:
                    raise RswapError(f"resctrl: task {task!r} was not given to open()")

    # -- applying --------------------------------------------------------------------------
    def apply(self, ways: Mapping[str, int] | None = None,
              percent: Mapping[str, int] | None = None,
              levels: Mapping[str, Mapping[int, int]] | None = None) -> list[tuple[str, str]]:
        """Write every schemata these allocations change, in one go (one tick)."""
        writes = self.plan(ways, percent, levels)
        self.ways.update(ways or {})
        self.percent.update(percent or {})
        self.levels.update({g: dict(v) for g, v in (levels or {}).items()})
        if self.dry_run:
            return writes
        for path, text in writes:
            self._write_schemata(path, text)
        return writes

    def _write_schemata(self, path: str, text: str) -> None:
        if not text.endswith("\n"):
            # rdtgroup_schemata_write() refuses a buffer without its newline *before* it clears
            # last_cmd_status: the refusal would be reported with an older command's text.
            text += "\n"
        if path not in self._journalled_schemata:
            original = self.fs.read(path)
            group = os.path.relpath(os.path.dirname(path), self.root)
            self.journal.record_custom(JOURNAL_KIND, {"action": "schemata", "root": self.root,
                                                      "group": "" if group == "." else group,
                                                      "original": original})
            self._journalled_schemata.add(path)
        try:
            self.fs.write(path, text)
        except OSError as err:
            raise EnforceError(path, f"kernel refused {text.strip()!r}: "
                               f"{self._refusal(err)}") from err
        self._last_written[path] = text

    def place(self, task: str, pids: Iterable[int]) -> int:
        """Move every thread of ``pids`` into ``task``'s group; return how many moved."""
        g = self.groups[self.group_of_task[task]]
        moved = 0
        tasks_file = os.path.join(g.path, "tasks")
        if self.dry_run:
            return 0
        already = set(_ints(self.fs.read(tasks_file)))
        for pid in pids:
            for tid in _threads(pid):
                if tid in already:
                    continue
                origin = self.group_of_tid(tid)
                if origin is None:
                    continue  # exited
                self.journal.record_custom(JOURNAL_KIND, {"action": "move", "root": self.root,
                                                          "tid": tid, "group": origin})
                try:
                    self.fs.write(tasks_file, str(tid))
                except OSError as err:
                    if err.errno == errno.ESRCH:
                        continue
                    raise EnforceError(tasks_file, f"cannot move thread {tid}: "
                                       f"{self._refusal(err)}") from err
                g.members.add(tid)
                moved += 1
        return moved

    def group_of_tid(self, tid: int) -> str | None:
        """The control group ``tid`` is in ("" = default group), or None if it is not running."""
        # /proc/<tid>/cpu_resctrl_groups names the group in the kernel's own resctrl mount (and
        # says "res:/" on a kernel built with it where nothing is mounted): it is the answer only
        # when self.root is that mount.  Elsewhere (a tree given by RSWAP_RESCTRL_ROOT) the
        # tasks files are.  Debian's 6.1 has the file; trusting it put a thread of a fake tree's
        # "ops" group back in the default group on restore.
        if self._kernel_mount is None:
            self._kernel_mount = _resctrl_mount_options(self.root) is not None
        if self._kernel_mount:
            proc = os.path.join(paths.root("PROCFS_ROOT"), str(tid), "cpu_resctrl_groups")
            try:
                with open(proc) as f:
                    for line in f:
                        if line.startswith("res:"):
                            return line[4:].strip().strip("/")
            except OSError:
                pass
        for name in [""] + [n for n in self.fs.listdir(self.root) if n not in ("info", "mon_data",
                                                                                 "mon_groups")]:
            d = os.path.join(self.root, name)
            tasks = os.path.join(d, "tasks")
            if name and not self.fs.exists(tasks):
                continue
            if tid in _ints(self.fs.read(tasks)):
                return name
        return None

    # -- reading back ----------------------------------------------------------------------
    def current(self) -> dict[str, str]:
        """Group name ("" = default) -> its schemata text as the kernel shows it now."""
        out = {"": self.fs.read(os.path.join(self.root, "schemata"))}
        for g in self.groups.values():
            p = os.path.join(g.path, "schemata")
            if self.fs.exists(p):
                out[g.name] = self.fs.read(p)
        return out

    def masks(self) -> dict[str, int]:
        """Group -> the L3 mask of its first domain, as the kernel shows it now."""
        out = {}
        for g, text in self.current().items():
            parsed = parse_schemata(text)
            doms = parsed.get("L3") or parsed.get("L3DATA")
            if doms:
                out[g] = int(next(iter(doms.values())), 16)
        return out

    def restore(self) -> None:
        """Undo through the journal (the same path a fresh ``rswap restore`` takes)."""
        self.journal.restore()
        self.groups.clear()
        self._journalled_schemata.clear()
        self._last_written.clear()

    # -- helpers ---------------------------------------------------------------------------
    def _need_info(self) -> ResctrlInfo:
        if self.info is None:
            raise RswapError("resctrl: open() first")
        return self.info

    def _last_cmd_status(self) -> str:
        try:
            return self.fs.read(os.path.join(self.root, "info", "last_cmd_status")).strip()
        except OSError:
            return ""

    def _refusal(self, err: OSError) -> str:
        """Why the kernel refused: ``last_cmd_status`` when it says something, else the errno.

        The kernel clears the status at the start of a command and reads ``ok`` when nothing was
        put there since; some refusals put nothing (an unknown domain id in ``parse_line()``
        returns EINVAL silently), so ``ok`` beside an error means "see errno", never success.
        """
        status = self._last_cmd_status()
        if status and status != "ok":
            return status
        return f"{err.strerror} (errno {err.errno}; last_cmd_status said nothing)"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split() if x.strip().isdigit()]


def _threads(pid: int) -> list[int]:
    """Thread ids of ``pid``: ``tasks`` takes one thread per write, unlike ``cgroup.procs``."""
    d = os.path.join(paths.root("PROCFS_ROOT"), str(pid), "task")
    try:
        return sorted(int(t) for t in os.listdir(d))
    except OSError:
        return [pid]


# -- undo -------------------------------------------------------------------------------------

def _undo(data: dict) -> None:
    root = data["root"]
    fs = fs_for(root)
    action = data["action"]
    if action == "schemata":
        d = os.path.join(root, data["group"]) if data["group"] else root
        path = os.path.join(d, "schemata")
        if fs.exists(path):
            fs.write(path, data["original"])
    elif action == "move":
        d = os.path.join(root, data["group"]) if data["group"] else root
        try:
            fs.write(os.path.join(d, "tasks"), str(data["tid"]))
        except OSError as err:
            if err.errno not in (errno.ESRCH, errno.ENOENT):
                raise
    elif action == "mkdir":
        path = os.path.join(root, data["group"])
        if fs.isdir(path):
            fs.rmdir(path)  # the kernel moves the group's remaining threads to the default group
    elif action == "mount":
        if fs.exists(os.path.join(root, "schemata")):
            subprocess.run(["umount", root], check=True, capture_output=True)


register_undo(JOURNAL_KIND, _undo)
