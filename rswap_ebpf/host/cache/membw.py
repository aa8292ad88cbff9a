"""Memory bandwidth: percent per task through resctrl MBA, sensed by MBM ``mbm_total_bytes``.

Usage in percent = the task's bytes/s *in its busiest L3 domain* over one domain's peak bytes/s,
which is ``[resources.membw] peak_bytes_per_s`` when configured (per domain: what one ``MB:<id>=``
value governs), else the highest rate seen in any one domain so far (so the first ticks overstate
usage until a busy period has been seen; configure the peak, e.g. from a STREAM run on one
socket, for steady figures).  An MB value applies per domain, so a sum over domains would let a
task on one socket read as half its use of that socket's bandwidth.
"""
from __future__ import annotations

from collections.abc import Mapping

from rswap_ebpf.host.cgroup import TaskCgroup, Write
import logging

from rswap_ebpf.host.cache.resctrl import MB_AMD_EIGHTH_GBPS, MB_MAX_PERCENT, MB_MIBPS
from rswap_ebpf.errors import ConfigError, FeatureMissing
from rswap_ebpf.model.resources import ResourceType
from rswap_ebpf.host.driver import DriverContext, ResourceDriver
from rswap_ebpf.host.cache.driver import ResctrlShared, _options, _tier_share, shared

log = logging.getLogger(__name__)


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
        rs.enforcer.mb_peak_bytes_per_s = peak_bytes_per_s
        self.mb_unit = unit

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
        return {n: 100.0 * r * _tier_share(self.rs.enforcer, n, self.rs.enforcer.percent, {}) / peak
                for n, r in rates.items()}

    def plan(self, cg: TaskCgroup, units: int) -> list[Write]:
        return self.rs.enforcer.plan(percent={cg.name: units})

    def apply(self, cg: TaskCgroup, units: int) -> list[Write]:
        return self.rs.enforcer.apply(percent={cg.name: units})

    def close(self) -> None:
        self.rs.close()


def make(ctx: DriverContext) -> MemBwDriver:
    peak = _options(ctx, ResourceType.MEMORY_BANDWIDTH).get("peak_bytes_per_s")
    return MemBwDriver(shared(ctx), float(peak) if peak else None)
