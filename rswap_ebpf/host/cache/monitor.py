"""Memory bandwidth and cache occupancy per resctrl group, from the kernel's MBM/CMT counters.

Each control group has ``mon_data/mon_L3_<id>/`` per L3 domain with ``mbm_total_bytes`` (bytes
of memory traffic since the group's RMID was assigned, a monotonic 64-bit count the kernel widens
from the hardware's 24/32-bit one) and ``llc_occupancy`` (bytes of L3 held now).  A counter may
read ``Unavailable`` (RMID not yet usable) or ``Error``: that domain is left out of the sample,
never counted as 0.

Every figure is also kept per domain (``*_by_domain``): an MB value and a cache mask apply per
domain, and a task running on one socket of a two-socket host fills its share of that socket's
L3 while the other's stays empty, so its sum (or average) over domains says nothing about whether
it fills its share anywhere.

One collector = one class with ``open()``, ``drain()``, ``close()`` like the BPF collectors.
"""
from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from rswap_ebpf import paths
from rswap_ebpf.host.cache.resctrl import ResctrlFS, fs_for
from rswap_ebpf.errors import FeatureMissing


@dataclass(frozen=True)
class MbmDelta:
    """Per group (a key of the ``groups`` mapping): bytes moved and bytes of L3 held."""

    interval_ns: int
    total_bytes: dict[str, int] = field(default_factory=dict)
    occupancy_bytes: dict[str, int] = field(default_factory=dict)
    unavailable: tuple[str, ...] = ()
    #: key -> L3 domain id -> bytes moved / bytes held there (the sums above are over these)
    total_bytes_by_domain: dict[str, dict[int, int]] = field(default_factory=dict)
    occupancy_by_domain: dict[str, dict[int, int]] = field(default_factory=dict)

    def bytes_per_s(self, key: str) -> float:
        b = self.total_bytes.get(key)
        if b is None or self.interval_ns <= 0:
            return 0.0
        return b * 1e9 / self.interval_ns

    def bytes_per_s_by_domain(self, key: str) -> dict[int, float]:
        if self.interval_ns <= 0:
            return {}
        return {d: b * 1e9 / self.interval_ns
                for d, b in self.total_bytes_by_domain.get(key, {}).items()}


class MbmCollector:
    """Reads ``mbm_total_bytes`` and ``llc_occupancy`` of each group every drain."""

    def __init__(self, groups: Mapping[str, str], root: str | None = None,
                 fs: ResctrlFS | None = None):
        """``groups``: key -> group directory name under the root ("" = default group)."""
        self.root = root or paths.root("RESCTRL_ROOT")
        self.fs = fs or fs_for(self.root)
        self.groups = dict(groups)
        self.features: set[str] = set()
        self._last: dict[tuple[str, str], dict[int, int]] = {}
        self._last_ns = 0

    def open(self) -> MbmCollector:
        feat = os.path.join(self.root, "info", "L3_MON", "mon_features")
        if not self.fs.exists(feat):
            raise FeatureMissing("resctrl monitoring (MBM/CMT)", f"{feat} is missing",
                                 "needs Intel RDT monitoring or AMD PQoS and a resctrl mount")
        self.features = set(self.fs.read(feat).split())
        if "mbm_total_bytes" not in self.features:
            raise FeatureMissing("resctrl MBM", "mon_features does not list mbm_total_bytes",
                                 "the CPU has no memory bandwidth monitoring")
        self._read_all()  # the baseline: the first drain reports traffic since now
        self._last_ns = time.monotonic_ns()
        return self

    def _counter(self, group: str, event: str) -> tuple[dict[int, int] | None, bool]:
        """``event`` per L3 domain id of the group; (None, True) if it has no domain directory,
        bad=True if any domain is unusable (that domain is left out)."""
        base = os.path.join(self.root, group, "mon_data") if group else os.path.join(
            self.root, "mon_data")
        per: dict[int, int] = {}
        bad = False
        try:
            doms = sorted(d for d in self.fs.listdir(base) if d.startswith("mon_L3_"))
        except OSError:
            return None, True
        for d in doms:
            try:
                text = self.fs.read(os.path.join(base, d, event)).strip()
            except OSError:
                bad = True
                continue
            if not text.isdigit():  # "Unavailable" or "Error"
                bad = True
                continue
            per[int(d[len("mon_L3_"):])] = int(text)
        return (None, True) if not doms else (per, bad)

    def _read_all(self):
        moved, held, unavailable = {}, {}, []
        for key, group in self.groups.items():
            per, bad = self._counter(group, "mbm_total_bytes")
            if bad:
                unavailable.append(key)
            if per is not None:
                prev = self._last.get((key, "mbm"))
                self._last[(key, "mbm")] = per
                if prev is not None and not bad:
                    # A smaller value means the group's RMID was reassigned: start again.
                    moved[key] = {d: v - prev.get(d, 0) if v >= prev.get(d, 0) else v
                                  for d, v in per.items()}
            if "llc_occupancy" in self.features:
                occ, obad = self._counter(group, "llc_occupancy")
                if occ is not None and not obad:
                    held[key] = occ
        return moved, held, unavailable

    def drain(self) -> MbmDelta:
        if not self._last_ns:
            raise RuntimeError("collector is not open")
        now = time.monotonic_ns()
        moved, held, unavailable = self._read_all()
        delta = MbmDelta(now - self._last_ns, {k: sum(v.values()) for k, v in moved.items()},
                         {k: sum(v.values()) for k, v in held.items()}, tuple(unavailable),
                         moved, held)
        self._last_ns = now
        return delta

    def close(self) -> None:
        self._last.clear()
        self._last_ns = 0

    def __enter__(self) -> MbmCollector:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()
