"""Which cache counters to open, on which CPUs: chosen by CPU vendor and PMU layout.

What ``PERF_COUNT_HW_CACHE_MISSES`` counts depends on the vendor (the kernel's event maps):

- Intel: LLC misses (``intel_perfmon_event_map``: event 0x2e umask 0x41, architectural), with
  LLC references (0x2e/0x4f) beside them.  Hybrid parts (Alder Lake and later) have no ``cpu``
  PMU but ``cpu_core`` and ``cpu_atom`` (Documentation: perf's ``intel-hybrid.txt``), each with
  its own ``type`` number and ``cpus`` list; the architectural LLC events are opened as raw
  events of each PMU's type on that PMU's CPUs.
- AMD Zen: the generic event is **L2** misses (``amd_zen1_perfmon_event_map`` and later: event
  0x64, "core to L2 cacheable request access status"), which more L3 ways do not lower.  The L3
  PMU (``amd_l3``) counts per CCX, not per task, so it cannot be charged to a slice.  rswap opens
  the core PMU's ``ls_dmnd_fills_from_sys`` (event 0x43) as a raw event: demand data-cache fills
  whose data came from beyond the local CCX's L3 (another CCX's cache or DRAM/MMIO, near or far:
  umask 0x04|0x08|0x10|0x40, plus 0x80 extension memory from Zen 4) are L3 misses as the core sees
  them; with 0x02 (fills from the local L3) they are the L3 references.  Not counted: prefetches
  and instruction fetches.  Where that event is not known (family before Zen) the generic event
  is kept and *labelled "L2 misses"*.

The CPU ids come from ``/sys/devices/system/cpu/online`` (and ``possible``), which may be sparse
(CPUs offlined, SMT siblings off): bcc keys its perf array by CPU id, so the array is sized by the
largest id + 1, never by ``os.cpu_count()``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from rswap_ebpf import paths
from rswap_ebpf.errors import FeatureMissing

# perf_event_open(2)
PERF_TYPE_HARDWARE = 0
PERF_TYPE_RAW = 4
PERF_COUNT_HW_CACHE_REFERENCES = 2
PERF_COUNT_HW_CACHE_MISSES = 3

#: Intel's architectural LLC events (Intel SDM vol. 3, "Pre-defined architectural events")
INTEL_LLC_MISSES = 0x412e
INTEL_LLC_REFERENCES = 0x4f2e
#: AMD Zen core PMU: ls_dmnd_fills_from_sys (PPR for family 17h/19h/1Ah)
ZEN_FILLS_EVENT = 0x43
ZEN_FILL_LOCAL_L3 = 0x02
ZEN_FILLS_BEYOND_L3 = {"zen1-2": 0x08 | 0x10 | 0x40,          # lcl_dram, rmt_cache, rmt_dram
                       "zen3": 0x04 | 0x08 | 0x10 | 0x40,      # + ext_cache_local
                       "zen4+": 0x04 | 0x08 | 0x10 | 0x40 | 0x80}  # + alternate_memories


@dataclass(frozen=True)
class PmuEvent:
    """One perf event: ``(type, config)`` for perf_event_open and what it really counts."""

    type: int
    config: int
    counts: str


@dataclass(frozen=True)
class PmuGroup:
    """The two counters (misses, references) opened on ``cpus`` of one PMU."""

    pmu: str
    cpus: tuple[int, ...]
    misses: PmuEvent
    refs: PmuEvent


@dataclass(frozen=True)
class PmuChoice:
    vendor: str                     # "intel" | "amd" | other vendor_id
    family: int
    model: int
    groups: tuple[PmuGroup, ...]
    label: str                      # what the miss counter counts, for docs and `rswap doctor`

    @property
    def hybrid(self) -> bool:
        return len(self.groups) > 1

    @property
    def counters(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(type, config) of the first group's counters (what a non-hybrid host opens)."""
        g = self.groups[0]
        return (g.misses.type, g.misses.config), (g.refs.type, g.refs.config)


def _sys(*parts: str) -> str:
    return os.path.join(paths.root("SYSFS_ROOT"), *parts)


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """``"0-3,8,10-11"`` -> (0, 1, 2, 3, 8, 10, 11), as sysfs writes CPU lists."""
    out: list[int] = []
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(sorted(set(out)))


def online_cpus() -> tuple[int, ...]:
    try:
        with open(_sys("devices", "system", "cpu", "online")) as f:
            return parse_cpu_list(f.read())
    except OSError:
        return tuple(range(os.cpu_count() or 1))


def cpu_id_limit() -> int:
    """Entries a per-CPU perf array needs: the largest online or possible CPU id + 1."""
    ids = list(online_cpus())
    try:
        with open(_sys("devices", "system", "cpu", "possible")) as f:
            ids += parse_cpu_list(f.read())
    except OSError:
        pass
    return max(ids, default=0) + 1


def cpu_identity() -> tuple[str, int, int]:
    """(vendor, family, model) from ``/proc/cpuinfo``; vendor "intel", "amd" or as written."""
    vendor, family, model = "", 0, 0
    try:
        with open(os.path.join(paths.root("PROCFS_ROOT"), "cpuinfo")) as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "vendor_id" and not vendor:
                    vendor = {"GenuineIntel": "intel", "AuthenticAMD": "amd",
                              "HygonGenuine": "hygon"}.get(value, value)
                elif key == "cpu family" and not family:
                    family = int(value)
                elif key == "model" and not model:
                    model = int(value)
                elif not line.strip() and vendor:
                    break
    except (OSError, ValueError):
        pass
    return vendor, family, model


def zen_generation(family: int, model: int) -> str | None:
    """Which ``ls_dmnd_fills_from_sys`` umask layout the part has; None before Zen."""
    if family == 0x17:
        return "zen1-2"
    if family == 0x19:
        zen4 = 0x10 <= model <= 0x1f or 0x60 <= model <= 0x7f or 0xa0 <= model <= 0xaf
        return "zen4+" if zen4 else "zen3"
    if family >= 0x1a:
        return "zen4+"
    return None


def _pmu_type(name: str) -> int | None:
    try:
        with open(_sys("bus", "event_source", "devices", name, "type")) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _pmu_cpus(name: str) -> tuple[int, ...]:
    try:
        with open(_sys("bus", "event_source", "devices", name, "cpus")) as f:
            return parse_cpu_list(f.read())
    except OSError:
        return ()


def select_events() -> PmuChoice:
    """The counters for this host, or :class:`FeatureMissing` saying which PMU is absent."""
    vendor, family, model = cpu_identity()
    online = online_cpus()
    hybrid = [n for n in ("cpu_core", "cpu_atom") if _pmu_type(n) is not None]
    if hybrid:
        groups = []
        for name in hybrid:
            typ = _pmu_type(name)
            cpus = tuple(c for c in _pmu_cpus(name) if c in online)
            if cpus:
                groups.append(PmuGroup(name, cpus,
                                       PmuEvent(typ, INTEL_LLC_MISSES, "LLC misses"),
                                       PmuEvent(typ, INTEL_LLC_REFERENCES, "LLC references")))
        if groups:
            return PmuChoice(vendor or "intel", family, model, tuple(groups),
                             "LLC misses (cpu_core and cpu_atom PMUs)")
    if _pmu_type("cpu") is None or not os.path.exists(
            _sys("bus", "event_source", "devices", "cpu", "events", "cache-misses")):
        raise pmu_missing()
    if vendor in ("amd", "hygon"):
        gen = zen_generation(family, model) if vendor == "amd" else "zen1-2"
        if gen is not None:
            beyond = ZEN_FILLS_BEYOND_L3[gen]
            misses = PmuEvent(PERF_TYPE_RAW, beyond << 8 | ZEN_FILLS_EVENT,
                              "L3 misses (demand data fills from beyond the local L3)")
            refs = PmuEvent(PERF_TYPE_RAW, (beyond | ZEN_FILL_LOCAL_L3) << 8 | ZEN_FILLS_EVENT,
                            "L3 references (demand data fills from the local L3 or beyond)")
            return PmuChoice(vendor, family, model, (PmuGroup("cpu", online, misses, refs),),
                             f"L3 misses ({gen}: ls_dmnd_fills_from_sys, demand data only)")
        label = "L2 misses (generic cache-misses on AMD)"
        return PmuChoice(vendor, family, model, (PmuGroup(
            "cpu", online, PmuEvent(PERF_TYPE_HARDWARE, PERF_COUNT_HW_CACHE_MISSES, "L2 misses"),
            PmuEvent(PERF_TYPE_HARDWARE, PERF_COUNT_HW_CACHE_REFERENCES, "L2 references")),),
            label)
    what = "LLC" if vendor == "intel" else "cache"
    return PmuChoice(vendor, family, model, (PmuGroup(
        "cpu", online,
        PmuEvent(PERF_TYPE_HARDWARE, PERF_COUNT_HW_CACHE_MISSES, f"{what} misses"),
        PmuEvent(PERF_TYPE_HARDWARE, PERF_COUNT_HW_CACHE_REFERENCES, f"{what} references")),),
        f"{what} misses (generic PERF_COUNT_HW_CACHE_MISSES)")


def pmu_missing() -> FeatureMissing:
    where = _sys("bus", "event_source", "devices")
    return FeatureMissing("hardware PMU", f"{where} has no cpu (or cpu_core/cpu_atom) PMU with "
                          "cache events: this CPU (or VM) exposes no cache-miss counters",
                          "run on bare metal, or give the VM a virtual PMU (e.g. -cpu host,pmu=on)")
