"""A resctrl mount in a temporary directory, validating writes the way the kernel does.

Layout and rules follow Documentation/arch/x86/resctrl.rst and the kernel's
fs/resctrl (rdtgroup.c, ctrlmondata.c):

- ``info/L3/{cbm_mask,min_cbm_bits,num_closids,shareable_bits,bit_usage,sparse_masks}``,
  ``info/MB/{bandwidth_gran,delay_linear,min_bandwidth,num_closids,thread_throttle_mode}``,
  ``info/L3_MON/{max_threshold_occupancy,mon_features,num_rmids}``, ``info/last_cmd_status``;
- the root and every control group hold ``schemata``, ``tasks``, ``cpus``, ``cpus_list``,
  ``mode``, ``size``, ``mon_data/mon_L3_<id>/{llc_occupancy,mbm_total_bytes,mbm_local_bytes}``
  and ``mon_groups/``;
- ``schemata`` is shown as the kernel's ``show_doms()`` prints it: cache masks zero-padded to the
  mask width (``%0*x``), MB percentages space-padded to three columns (``%*u``).

How honest it is: the files are real files on disk (readers see them with open()), but the
kernel's *validation on write* can only happen in code, so writes must go through
:meth:`FakeResctrl.write` (the :class:`ResctrlFS` seam the enforcer uses).  It reproduces
``rdtgroup_schemata_write()`` (buffer must end in a newline, refused before last_cmd_status is
cleared; the status cleared to ``ok``; an unknown domain id -> EINVAL with no message, so the
status reads ``ok``; an unknown resource, a
non-hex or out-of-range mask, non-consecutive 1-bits unless sparse_masks, fewer than min_cbm_bits
bits, an MB value outside [min_bandwidth, 100] -> EINVAL with the kernel's last_cmd_status text;
MB rounded *up* to bandwidth_gran; a failed write changes nothing), ``rdtgroup_tasks_write()``
(unknown pid -> ESRCH; a thread is in exactly one group), ``mkdir`` (ENOSPC when CLOSIDs run out;
the new group gets the full mask and 100 %) and ``rmdir`` (its threads return to the default group).
Vendors and modes (``vendor="amd"``, ``mba_mbps=True``), as ``__rdt_get_mem_config_amd()`` and
the MBA software controller set them up: on AMD, MB values are absolute rates in multiples of
1/8 GB/s, ``min_bandwidth`` 0, ``bandwidth_gran`` 1, ``delay_linear`` 0, the range checked is
[0, max_bw] (``amd_max_bw``, 2048 = 256 GB/s on current parts) and new groups start at max_bw;
under ``mba_MBps`` any u32 is accepted (MiB/s, no range check, no rounding) and groups start at
4294967295 (``MBA_MAX_MBPS``).
``vendor="amd"`` also sets ``sparse_masks`` 1 and ``min_cbm_bits`` 0 (``arch_has_sparse_bitmasks``,
``arch_has_empty_bitmaps``): any set of ways, even none, is a legal mask there.
``cdp=True`` is a mount with ``-o cdp``: ``info/L3CODE`` and ``info/L3DATA`` replace ``info/L3``,
each showing half the CLOSIDs, and every group's schemata has an ``L3CODE`` and an ``L3DATA`` line
(an ``L3`` line is an unknown resource).  ``shareable_bits`` is shown as given.  RMIDs: every
control group holds one (``num_rmids``, the default group's included); ``rmdir`` of a group whose
occupancy is above ``max_threshold_occupancy`` leaves its RMID in limbo until
:meth:`FakeResctrl.clear_limbo`; ``mkdir`` with no free RMID fails EBUSY while some are in limbo,
ENOSPC otherwise, "Out of RMIDs" in ``last_cmd_status`` (``resctrl_find_free_rmid()``).
Not reproduced: exclusive/pseudo-locked modes, cpus masks, monitor groups (mon_groups/ mkdir).

Across processes (``state_file``): the kernel's resctrl state outlives the process that changed
it, so a fake shared by a ``rswap run`` subprocess and a later ``rswap restore`` keeps its state
in a JSON file beside the tree, replaced atomically (rename) after every change, the way a
kernel change is all or nothing.  :meth:`FakeResctrl.attach` rebuilds the fake from that file in a
new process and re-renders the tree from it (a process killed mid-render leaves torn files; the
state file is the truth).  ``live_pids``: thread ids are this host's (a tid exists while
``/proc/<tid>`` does, and an exited thread leaves its group, as in the kernel) instead of a fixed
set; tests/fakes/rswap_fake_resctrl.py starts ``rswap`` with such a fake in place.
"""
from __future__ import annotations

import errno
import json
import os
import shutil

from rswap_ebpf.host.cache.resctrl import ResctrlFS, register_fs

_GROUP_FILES = ("schemata", "tasks", "cpus", "cpus_list", "mode", "size")


class FakeResctrl(ResctrlFS):
    def __init__(self, root: str, cbm_mask: str = "fffff", min_cbm_bits: int | None = None,
                 num_closids: int = 16, l3_domains=(0, 1), bw_gran: int = 10,
                 min_bandwidth: int = 10, mb: bool = True, sparse_masks: bool | None = None,
                 pids=(1,), ncpus: int = 2, vendor: str = "intel", amd_max_bw: int = 2048,
                 mba_mbps: bool = False, state_file: str | None = None, live_pids: bool = False,
                 cdp: bool = False, shareable_bits: str = "0", num_rmids: int = 224):
        self.state_file = state_file
        self.live_pids = live_pids
        self.root = os.path.realpath(root)
        self.cbm_mask = int(cbm_mask, 16)
        self.cbm_len = self.cbm_mask.bit_length()
        self.width = (self.cbm_len + 3) // 4
        amd = vendor == "amd"
        # AMD: arch_has_sparse_bitmasks and arch_has_empty_bitmaps (min_cbm_bits 0)
        self.min_cbm_bits = (0 if amd else 1) if min_cbm_bits is None else min_cbm_bits
        self.sparse = amd if sparse_masks is None else sparse_masks
        self.cdp = cdp
        # CDP: each CLOSID carries a code and a data mask, so half as many groups are possible
        self.num_closids = num_closids // 2 if cdp else num_closids
        self.shareable = int(shareable_bits, 16)
        self.num_rmids = num_rmids
        self.limbo = 0                     # RMIDs freed but still tagging cache lines
        self.domains = tuple(l3_domains)
        self.vendor = vendor
        self.mba_sc = mba_mbps
        self.bw_gran = 1 if amd else bw_gran
        self.min_bw = 0 if amd else min_bandwidth
        self.max_bw = amd_max_bw if amd else 100
        self.mb_default = 2**32 - 1 if mba_mbps else self.max_bw
        self.mb = mb
        self.ncpus = ncpus
        self.pids: set[int] = set(pids)
        # group name ("" = default) -> state
        self.groups: dict[str, dict] = {}
        self.mbm: dict[tuple[str, int], int] = {}
        self.occupancy: dict[tuple[str, int], int] = {}
        self.last_cmd_status = "ok"
        os.makedirs(self.root, exist_ok=True)
        self._build_info()
        self._new_group("")
        self._save()
        register_fs(self.root, self)

    def close(self) -> None:
        register_fs(self.root, None)

    # -- the state that outlives a process -------------------------------------------------
    _PARAMS = ("cbm_mask", "cbm_len", "width", "min_cbm_bits", "num_closids", "domains", "vendor",
               "mba_sc", "bw_gran", "min_bw", "max_bw", "mb_default", "mb", "sparse", "ncpus",
               "live_pids", "last_cmd_status", "cdp", "shareable", "num_rmids", "limbo")

    @property
    def cache_names(self) -> tuple[str, ...]:
        return ("L3CODE", "L3DATA") if self.cdp else ("L3",)

    def _save(self) -> None:
        if not self.state_file:
            return
        state = {k: getattr(self, k) for k in self._PARAMS}
        state["pids"] = sorted(self.pids)
        state["groups"] = {n: {**{r: list(g[r].items()) for r in self.cache_names + ("MB",)},
                               "tasks": sorted(g["tasks"])} for n, g in self.groups.items()}
        state["mbm"] = [[g, d, v] for (g, d), v in self.mbm.items()]
        state["occupancy"] = [[g, d, v] for (g, d), v in self.occupancy.items()]
        tmp = f"{self.state_file}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, self.state_file)

    @classmethod
    def attach(cls, root: str, state_file: str) -> "FakeResctrl":
        """The fake a previous process left at ``root``, rebuilt from ``state_file`` in this one
        (registered, like a new instance), its tree re-rendered from that state."""
        with open(state_file) as f:
            state = json.load(f)
        self = cls.__new__(cls)
        self.root = os.path.realpath(root)
        self.state_file = state_file
        for k in cls._PARAMS:
            setattr(self, k, state[k])
        self.domains = tuple(self.domains)
        self.pids = set(state["pids"])
        self.groups = {n: {**{r: {int(d): v for d, v in g[r]} for r in self.cache_names + ("MB",)},
                           "tasks": set(g["tasks"])} for n, g in state["groups"].items()}
        self.mbm = {(g, d): v for g, d, v in state["mbm"]}
        self.occupancy = {(g, d): v for g, d, v in state["occupancy"]}
        for name in os.listdir(self.root):  # a group whose mkdir/rmdir a kill cut short
            if name not in ("info",) and os.path.isdir(os.path.join(self.root, name)) \
                    and name not in ("mon_data", "mon_groups") and name not in self.groups:
                shutil.rmtree(os.path.join(self.root, name))
        self._build_info()
        self._status(self.last_cmd_status)
        for name in self.groups:
            if name:
                os.makedirs(os.path.join(self.root, name, "mon_groups"), exist_ok=True)
                for dom in self.domains:
                    os.makedirs(os.path.join(self.root, name, "mon_data", f"mon_L3_{dom:02d}"),
                                exist_ok=True)
                self._write_file(os.path.join(self.root, name, "mode"), "shareable\n")
                self._write_file(os.path.join(self.root, name, "cpus"), f"{(1 << self.ncpus) - 1:x}\n")
                self._write_file(os.path.join(self.root, name, "cpus_list"), f"0-{self.ncpus - 1}\n")
        for name in self.groups:
            self._render(name)
        register_fs(self.root, self)
        return self

    def _exists(self, pid: int) -> bool:
        if self.live_pids:
            return os.path.exists(f"/proc/{pid}")
        return pid in self.pids

    @staticmethod
    def _host_tids() -> set[int]:
        out: set[int] = set()
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    out.update(int(t) for t in os.listdir(f"/proc/{pid}/task"))
                except OSError:
                    pass
        return out

    def read(self, path: str) -> str:
        """As the kernel shows it now: with ``live_pids`` the default group's ``tasks`` is every
        thread of the host outside the other groups, at the time of reading."""
        if self.live_pids and os.path.realpath(path) == os.path.join(self.root, "tasks"):
            self._render("")
        return super().read(path)

    # -- test helpers --------------------------------------------------------------------
    def spawn(self, pid: int) -> None:
        """A new thread appears in the default group, as after fork() from a default thread."""
        self.pids.add(pid)
        self._render("")

    def add_traffic(self, group: str, domain: int, nbytes: int) -> None:
        """Memory traffic of the group's threads on one L3 domain (MBM counts up)."""
        self.mbm[(group, domain)] = self.mbm.get((group, domain), 0) + nbytes
        self._render(group)

    def set_occupancy(self, group: str, domain: int, nbytes: int) -> None:
        self.occupancy[(group, domain)] = nbytes
        self._render(group)

    #: info/L3_MON/max_threshold_occupancy: an RMID freed above this stays in limbo
    LIMBO_THRESHOLD = 1048576

    def clear_limbo(self) -> None:
        """The limbo worker found the lines aged out: every limbo RMID is free again."""
        self.limbo = 0
        self._save()

    def group_of(self, pid: int) -> str:
        for name, g in self.groups.items():
            if pid in g["tasks"]:
                return name
        return ""

    # -- the ResctrlFS seam ----------------------------------------------------------------
    def write(self, path: str, text: str) -> None:
        group, fname = self._locate(path)
        if fname == "schemata":
            self._write_schemata(group, text)
        elif fname == "tasks":
            self._write_tasks(group, text)
        else:
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), path)
        self._write_file(os.path.join(self.root, "info", "last_cmd_status"), self.last_cmd_status + "\n")
        self._save()

    def mkdir(self, path: str) -> None:
        parent, name = os.path.split(os.path.realpath(path))
        if parent != self.root or name in ("info", "mon_data", "mon_groups"):
            raise OSError(errno.EPERM, os.strerror(errno.EPERM), path)
        if name in self.groups:
            raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), path)
        self._status("ok")
        if len(self.groups) >= self.num_closids:        # closid_alloc()
            self._status("Out of CLOSIDs")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        if len(self.groups) + self.limbo >= self.num_rmids:   # alloc_rmid(), one per group
            # resctrl_find_free_rmid(): no free RMID -> EBUSY while some are in limbo, else
            # ENOSPC; mkdir_rdt_prepare_rmid_alloc() says "Out of RMIDs" either way.
            self._status("Out of RMIDs")
            err = errno.EBUSY if self.limbo else errno.ENOSPC
            raise OSError(err, os.strerror(err), path)
        self._new_group(name)
        self._save()

    def rmdir(self, path: str) -> None:
        parent, name = os.path.split(os.path.realpath(path))
        if parent != self.root or name not in self.groups or not name:
            raise OSError(errno.EPERM, os.strerror(errno.EPERM), path)
        g = self.groups.pop(name)
        self.groups[""]["tasks"] |= g["tasks"]
        if any(self.occupancy.get((name, d), 0) > self.LIMBO_THRESHOLD for d in self.domains):
            self.limbo += 1     # its RMID still tags cache lines: free_rmid() puts it in limbo
        for d in self.domains:
            self.occupancy.pop((name, d), None)
            self.mbm.pop((name, d), None)
        self._save()
        shutil.rmtree(path)
        self._render("")

    # -- kernel behaviour -----------------------------------------------------------------
    def _status(self, text: str) -> None:
        self.last_cmd_status = text
        self._write_file(os.path.join(self.root, "info", "last_cmd_status"), text + "\n")

    def _fail(self, text: str, err: int = errno.EINVAL):
        self._status(text)
        raise OSError(err, os.strerror(err))

    def _write_schemata(self, group: str, buf: str) -> None:
        if not buf or not buf.endswith("\n"):  # rdtgroup_schemata_write(): -EINVAL, no message
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        self._status("ok")  # rdt_last_cmd_clear(): after the newline check, before parsing
        staged = {r: dict(self.groups[group][r]) for r in self.cache_names + ("MB",)}
        for line in buf.splitlines():
            line = line.strip()
            if not line:
                continue
            name, sep, doms = line.partition(":")
            name = name.strip()
            if not sep or name not in staged or (name == "MB" and not self.mb):
                self._fail(f"Unknown or unsupported resource name '{name}'")
            for item in doms.split(";"):
                item = item.strip()
                dom, eq, value = item.partition("=")
                try:
                    dom_id = int(dom, 10)
                except ValueError:
                    dom_id = None
                if not eq or dom_id is None:
                    self._fail("Missing '=' or non-numeric domain")
                if dom_id not in self.domains:
                    # parse_line() finds no domain of that id and returns -EINVAL without a
                    # message: last_cmd_status reads "ok" beside the error.
                    raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
                staged[name][dom_id] = (self._bw_validate(value.strip()) if name == "MB"
                                        else self._cbm_validate(value.strip()))
        self.groups[group].update(staged)
        self._status("ok")
        self._render(group)

    def _cbm_validate(self, buf: str) -> int:
        try:
            val = int(buf, 16)
        except ValueError:
            self._fail(f"Non-hex character in the mask {buf}")
        if (self.min_cbm_bits > 0 and val == 0) or val > self.cbm_mask:
            self._fail("Mask out of range")
        if val == 0:
            return val
        first = (val & -val).bit_length() - 1
        run = val >> first
        zero = first + ((~run & (run + 1)).bit_length() - 1)
        if not self.sparse and val >> zero:
            self._fail(f"The mask {val:x} has non-consecutive 1-bits")
        if zero - first < self.min_cbm_bits:
            self._fail(f"Need at least {self.min_cbm_bits} bits in the mask")
        return val

    def _bw_validate(self, buf: str) -> int:
        try:
            bw = int(buf, 10)
        except ValueError:
            self._fail(f"Invalid MB value {buf}")
        if self.mba_sc:  # "Nothing else to do if software controller is enabled."
            if bw > 2**32 - 1:
                self._fail(f"Invalid MB value {buf}")
            return bw
        if bw < self.min_bw or bw > self.max_bw:
            self._fail(f"MB value {bw} out of range [{self.min_bw},{self.max_bw}]")
        return -(-bw // self.bw_gran) * self.bw_gran  # roundup(bw, bw_gran)

    def _write_tasks(self, group: str, buf: str) -> None:
        for item in buf.strip().split(","):
            item = item.strip()
            try:
                pid = int(item)
            except ValueError:
                self._fail(f"Invalid pid {item!r}")
            if not self._exists(pid):
                self._fail(f"No task {pid}", errno.ESRCH)
            for g in self.groups.values():
                g["tasks"].discard(pid)
            self.groups[group]["tasks"].add(pid)
        self._status("ok")
        for name in self.groups:
            self._render(name)

    # -- the tree on disk -----------------------------------------------------------------
    def _locate(self, path: str) -> tuple[str, str]:
        d, fname = os.path.split(os.path.realpath(path))
        if d == self.root:
            return "", fname
        parent, name = os.path.split(d)
        if parent == self.root and name in self.groups:
            return name, fname
        raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)

    def _dir(self, group: str) -> str:
        return os.path.join(self.root, group) if group else self.root

    def _write_file(self, path: str, text: str) -> None:
        with open(path, "w") as f:
            f.write(text)

    def _build_info(self) -> None:
        info = os.path.join(self.root, "info")
        files = {
            "last_cmd_status": "ok\n",
            "L3_MON/max_threshold_occupancy": f"{self.LIMBO_THRESHOLD}\n",
            "L3_MON/mon_features": "llc_occupancy\nmbm_total_bytes\nmbm_local_bytes\n",
            "L3_MON/num_rmids": f"{self.num_rmids}\n",
        }
        for res in self.cache_names:    # under CDP: info/L3CODE and info/L3DATA, no info/L3
            files.update({
                f"{res}/cbm_mask": f"{self.cbm_mask:x}\n",
                f"{res}/min_cbm_bits": f"{self.min_cbm_bits}\n",
                f"{res}/num_closids": f"{self.num_closids}\n",
                f"{res}/shareable_bits": f"{self.shareable:x}\n",
                f"{res}/bit_usage": ";".join(f"{d}=" + "X" * self.cbm_len
                                             for d in self.domains) + "\n",
                f"{res}/sparse_masks": f"{int(self.sparse)}\n",
            })
        if self.mb:
            files.update({
                "MB/bandwidth_gran": f"{self.bw_gran}\n",
                "MB/delay_linear": "0\n" if self.vendor == "amd" else "1\n",
                "MB/min_bandwidth": f"{self.min_bw}\n",
                "MB/num_closids": f"{self.num_closids}\n",
                "MB/thread_throttle_mode": "max\n",
            })
        for rel, text in files.items():
            path = os.path.join(info, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self._write_file(path, text)

    def _new_group(self, name: str) -> None:
        self.groups[name] = {**{r: {d: self.cbm_mask for d in self.domains}
                                for r in self.cache_names},
                             "MB": {d: self.mb_default for d in self.domains} if self.mb else {},
                             "tasks": set(self.pids) if not name else set()}
        d = self._dir(name)
        os.makedirs(os.path.join(d, "mon_groups"), exist_ok=True)
        for dom in self.domains:
            os.makedirs(os.path.join(d, "mon_data", f"mon_L3_{dom:02d}"), exist_ok=True)
        self._write_file(os.path.join(d, "mode"), "shareable\n")
        self._write_file(os.path.join(d, "cpus"), f"{(1 << self.ncpus) - 1:x}\n")
        self._write_file(os.path.join(d, "cpus_list"), f"0-{self.ncpus - 1}\n")
        self._render(name)

    def _render(self, name: str) -> None:
        g = self.groups[name]
        d = self._dir(name)
        if self.live_pids:  # an exited thread leaves its group; the default group has the rest
            host = self._host_tids()
            for x in self.groups.values():
                x["tasks"] &= host
            self.pids = host
        lines = [f"{r}:" + ";".join(f"{dom}={v:0{self.width}x}" for dom, v in sorted(g[r].items()))
                 for r in self.cache_names]
        if self.mb:
            lines.append("MB:" + ";".join(f"{dom}={v:3d}" for dom, v in sorted(g["MB"].items())))
        self._write_file(os.path.join(d, "schemata"), "\n".join(lines) + "\n")
        tasks = g["tasks"] if name else self.pids - set().union(
            *(x["tasks"] for n, x in self.groups.items() if n))
        if not name:
            g["tasks"] = set(tasks)
        self._write_file(os.path.join(d, "tasks"), "".join(f"{p}\n" for p in sorted(tasks)))
        size_lines: dict[str, list[str]] = {r: [] for r in self.cache_names}
        for dom in self.domains:
            mon = os.path.join(d, "mon_data", f"mon_L3_{dom:02d}")
            self._write_file(os.path.join(mon, "mbm_total_bytes"), f"{self.mbm.get((name, dom), 0)}\n")
            self._write_file(os.path.join(mon, "mbm_local_bytes"), f"{self.mbm.get((name, dom), 0)}\n")
            self._write_file(os.path.join(mon, "llc_occupancy"), f"{self.occupancy.get((name, dom), 0)}\n")
            for r in self.cache_names:
                size_lines[r].append(f"{dom}={bin(g[r][dom]).count('1') * 1441792}")
        self._write_file(os.path.join(d, "size"), "".join(f"{r}:" + ";".join(v) + "\n"
                                                          for r, v in size_lines.items()))
