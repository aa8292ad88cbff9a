"""PMU collector without a PMU: it says so, and its drain arithmetic is right."""
from __future__ import annotations

import pytest

from rswap_ebpf.errors import FeatureMissing
from rswap_ebpf.host.cache import pmu


def test_no_pmu_is_missing_with_why_and_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("RSWAP_PMU_EVENTS_DIR", str(tmp_path))
    assert not pmu.pmu_available()
    with pytest.raises(FeatureMissing) as exc:
        pmu.PmuCollector().open()
    assert exc.value.feature == "hardware PMU" and exc.value.fix
    (tmp_path / "cache-misses").write_text("event=0x2e,umask=0x41\n")
    assert pmu.pmu_available()


class _Val:
    def __init__(self, m, r, s):
        self.misses, self.refs, self.slices = m, r, s


class _Table:
    """Shaped like a bcc per-CPU hash: items_lookup_and_delete_batch() -> [(key, [per-cpu])]."""

    def __init__(self, items):
        self.items_ = items

    def items_lookup_and_delete_batch(self):
        out, self.items_ = self.items_, []
        return out


def test_drain_sums_per_cpu_values():
    t = _Table([(7, [_Val(10, 100, 1), _Val(5, 50, 2)]), (9, [_Val(0, 3, 1)])])
    got = pmu._drain(t)
    assert got == {7: pmu.PmuCounts(15, 150, 3), 9: pmu.PmuCounts(0, 3, 1)}
    assert got[7].miss_ratio == pytest.approx(0.1) and pmu.PmuCounts().miss_ratio is None
    d = pmu.PmuDelta(500_000_000, got, {})
    assert d.misses_per_s(got[7]) == pytest.approx(30.0)
