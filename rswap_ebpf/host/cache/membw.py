"""Memory bandwidth: percent per task through resctrl MBA, sensed by MBM ``mbm_total_bytes``.

Usage in percent = the task's bytes/s *in its busiest L3 domain* over one domain's peak bytes/s,
which is ``[resources.membw] peak_bytes_per_s`` when configured (per domain: what one ``MB:<id>=``
value governs), else the highest rate seen in any one domain so far (so the first ticks overstate
usage until a busy period has been seen; configure the peak, e.g. from a STREAM run on one
socket, for steady figures).  An MB value applies per domain, so a sum over domains would let a
task on one socket read as half its use of that socket's bandwidth.

Enforcement is in the unit sensing is in:

- AMD (MB values are 1/8 GB/s) and ``-o mba_MBps`` (MiB/s): the allocation, percent of the peak,
  is written as that rate.  On AMD without a configured peak the peak is the hardware maximum
  (``mb_max`` / 8 GB/s) for sensing too, so both sides mean the same bytes/s.
- Intel without mba_MBps: an MB value is a throttle level, not a share of bandwidth, and no
  fixed map from level to bytes/s exists (it depends on the threads and the access pattern).
  The allocation is therefore never written as a level: each group's level in each MB domain
  (an MB value applies per domain) starts unthrottled (100) and moves one ``bandwidth_gran`` step
  a tick, by that domain's MBM, down while MBM shows the group above its
  allocation, up while it is below it by more than :data:`STEER_SLACK` - the feedback the kernel's
  software controller applies under mba_MBps (``update_mba_bw()``).  Mounting with ``-o mba_MBps``
  lets the kernel do this every second instead of rswap every tick.
"""
from __future__ import annotations

from collections.abc import Mapping

from rswap_ebpf.host.cgroup import TaskCgroup, Write
import logging

from rswap_ebpf.host.cache.resctrl import (MB_AMD_EIGHTH_GBPS, MB_MAX_PERCENT, MB_MIBPS,
                                           MB_PERCENT)
from rswap_ebpf.errors import ConfigError, FeatureMissing
from rswap_ebpf.model.resources import ResourceType
from rswap_ebpf.host.driver import DriverContext, ResourceDriver
from rswap_ebpf.host.cache.driver import ResctrlShared, _options, _tier_share, shared

log = logging.getLogger(__name__)

#: a throttled group below its allocation by more than this share of it is given one step more
STEER_SLACK = 0.1


class MemBwDriver(ResourceDriver):
    resource = ResourceType.MEMORY_BANDWIDTH

    def __init__(self, rs: ResctrlShared, peak_bytes_per_s: float | None = None):
        if not rs.info.has_mb:
            raise FeatureMissing("resctrl MB allocation", "info/MB is missing",
                                 "the CPU has no memory bandwidth allocation (Intel MBA / AMD BMEC)")
        self.rs = rs
        self.peak_bytes_per_s = peak_bytes_per_s
        self.seen_peak = 0.0
        # Percent is rswap's unit everywhere; the enforcer turns it into this host's MB unit.
        unit = rs.info.mb_unit
        if unit == MB_MIBPS and not peak_bytes_per_s:
            raise ConfigError("resources.membw.peak_bytes_per_s", "resctrl is mounted with "
                              "mba_MBps, so MB values are MiB/s: give the domain's peak rate so "
                              "rswap can turn percent into MiB/s")
        if unit == MB_AMD_EIGHTH_GBPS and not peak_bytes_per_s:
            log.warning("AMD MBA takes 1/8 GB/s: percent is of the hardware maximum %d (%g GB/s); "
                        "set [resources.membw] peak_bytes_per_s for percent of your memory's rate",
                        rs.info.mb_max, rs.info.mb_max / 8)
            # Sense against the same maximum the MB values are written against.
            self.peak_bytes_per_s = rs.info.mb_max * 1e9 / 8
        if unit == MB_PERCENT:
            log.info("Intel MBA without mba_MBps: MB values are throttle levels; rswap steers "
                     "each group's level from MBM (mount with -o mba_MBps for the kernel to)")
        rs.enforcer.mb_peak_bytes_per_s = peak_bytes_per_s
        self.mb_unit = unit
        self.steered = unit == MB_PERCENT
        self.allocated: dict[str, int] = {}      # task -> percent of the peak it was given
        #: group -> MB domain id -> throttle level written (steered)
        self.level: dict[str, dict[int, int]] = {}

    def total(self) -> int:
        return MB_MAX_PERCENT

    def open(self) -> None:
        self.rs.open()

    def measure(self, tasks: Mapping[str, TaskCgroup]) -> dict[str, float]:
        """Percent of the peak each task moved; {} when MBM is missing (not zeros)."""
        self.rs.place(tasks)
        sample = self.rs.sample(tasks)
        if sample is None:
            return {}
        per_dom = {n: sample.bytes_per_s_by_domain(n) for n in tasks if n in sample.total_bytes}
        rates = {n: max(r.values(), default=0.0) for n, r in per_dom.items()}
        # In per-tier mode every member reads the same group: count each group once.
        seen_groups: dict[str, dict[int, float]] = {}
        for n, r in per_dom.items():
            seen_groups[self.rs.enforcer.group_of_task[n]] = r
        domains = {d for r in seen_groups.values() for d in r}
        self.seen_peak = max([self.seen_peak] + [sum(r.get(d, 0.0) for r in seen_groups.values())
                                                 for d in domains])
        peak = self.peak_bytes_per_s or self.seen_peak
        if peak <= 0:
            return {n: 0.0 for n in rates}
        if self.steered:
            self._steer({g: {d: 100.0 * b / peak for d, b in r.items()}
                         for g, r in seen_groups.items()})
        share = self.allocated if self.steered else self.rs.enforcer.percent
        return {n: 100.0 * r * _tier_share(self.rs.enforcer, n, share, {}) / peak
                for n, r in rates.items()}

    # -- Intel throttle levels, steered by what MBM measures -------------------------------
    def _group_allocation(self, group: str) -> int:
        enf = self.rs.enforcer
        return sum(p for t, p in self.allocated.items() if enf.group_of_task.get(t) == group)

    def _steer(self, used_pct: Mapping[str, Mapping[int, float]]) -> None:
        """One step of each allocated group's throttle level in each domain toward its
        allocation, by what MBM measured in that domain."""
        info = self.rs.info
        gran = max(1, info.bw_gran)
        floor = max(info.min_bw, gran)
        moved: dict[str, dict[int, int]] = {}
        for group, levels in self.level.items():
            want = self._group_allocation(group)
            used = used_pct.get(group)
            if used is None:
                continue
            new = dict(levels)
            for d in info.mb_domains:
                level, u = levels.get(d, MB_MAX_PERCENT), used.get(d, 0.0)
                if u > want and level > floor:
                    new[d] = max(floor, level - gran)
                elif u < want * (1 - STEER_SLACK) and level < MB_MAX_PERCENT:
                    new[d] = min(MB_MAX_PERCENT, level + gran)
            if new != levels:
                moved[group] = new
        if moved:
            self.level.update(moved)
            self.rs.enforcer.apply(levels=moved)

    def _levels_for(self, cg: TaskCgroup, units: int) -> dict[str, dict[int, int]]:
        group = self.rs.enforcer.group_of_task[cg.name]
        if units >= MB_MAX_PERCENT:
            return {group: {d: MB_MAX_PERCENT for d in self.rs.info.mb_domains}}
        return {group: self.level.get(group, {d: MB_MAX_PERCENT for d in self.rs.info.mb_domains})}

    def plan(self, cg: TaskCgroup, units: int) -> list[Write]:
        if self.steered:
            return self.rs.enforcer.plan(levels=self._levels_for(cg, units))
        return self.rs.enforcer.plan(percent={cg.name: units})

    def apply(self, cg: TaskCgroup, units: int) -> list[Write]:
        """Rate hosts: write the allocation as a rate.  Intel percent hosts: record it as the
        target :meth:`measure` steers the group's throttle level to (unthrottled at first)."""
        if not self.steered:
            return self.rs.enforcer.apply(percent={cg.name: units})
        self.allocated[cg.name] = int(units)
        levels = self._levels_for(cg, units)
        self.level.update(levels)
        return self.rs.enforcer.apply(levels=levels)

    def close(self) -> None:
        self.rs.close()


def make(ctx: DriverContext) -> MemBwDriver:
    peak = _options(ctx, ResourceType.MEMORY_BANDWIDTH).get("peak_bytes_per_s")
    return MemBwDriver(shared(ctx), float(peak) if peak else None)
