"""PMU event choice per vendor against a sysfs/procfs tree laid out as the kernel's, and the
collector's drain arithmetic.

The trees follow what the kernel exports: ``/sys/bus/event_source/devices/<pmu>/{type,cpus,
events/}`` (Documentation/ABI/testing/sysfs-bus-event_source-devices-events; hybrid Intel: perf's
``intel-hybrid.txt``, ``cpu_core``/``cpu_atom`` and no ``cpu``), ``/sys/devices/system/cpu/
{online,possible}`` (cpu-hotplug.rst) and ``/proc/cpuinfo``'s vendor_id / cpu family / model.
"""
from __future__ import annotations

import pytest

from rswap_ebpf.errors import FeatureMissing
from rswap_ebpf.host.cache import pmu, pmu_events


def _host(tmp_path, monkeypatch, vendor="GenuineIntel", family=6, model=143, pmus=("cpu",),
          online="0-3", possible=None, cpus=None):
    sysfs, proc = tmp_path / "sys", tmp_path / "proc"
    proc.mkdir(parents=True, exist_ok=True)
    (proc / "cpuinfo").write_text(f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: "
                                  f"{family}\nmodel\t\t: {model}\n\n")
    cpu = sysfs / "devices" / "system" / "cpu"
    cpu.mkdir(parents=True, exist_ok=True)
    (cpu / "online").write_text(online + "\n")
    (cpu / "possible").write_text((possible or online) + "\n")
    for i, name in enumerate(pmus):
        d = sysfs / "bus" / "event_source" / "devices" / name
        (d / "events").mkdir(parents=True, exist_ok=True)
        (d / "type").write_text(f"{4 if name == 'cpu' else 8 + i}\n")
        (d / "events" / "cache-misses").write_text("event=0x2e,umask=0x41\n")
        if cpus and name in cpus:
            (d / "cpus").write_text(cpus[name] + "\n")
    monkeypatch.setenv("RSWAP_SYSFS_ROOT", str(sysfs))
    monkeypatch.setenv("RSWAP_PROCFS_ROOT", str(proc))


def test_no_pmu_is_missing_with_why_and_fix(tmp_path, monkeypatch):
    _host(tmp_path, monkeypatch, pmus=())
    assert not pmu.pmu_available()
    with pytest.raises(FeatureMissing) as exc:
        pmu.PmuCollector().open()
    assert exc.value.feature == "hardware PMU" and exc.value.fix
    _host(tmp_path, monkeypatch, pmus=("cpu",))
    assert pmu.pmu_available()


def test_intel_counts_llc_misses_with_the_generic_event(tmp_path, monkeypatch):
    _host(tmp_path, monkeypatch)
    c = pmu_events.select_events()
    assert c.vendor == "intel" and not c.hybrid
    assert c.counters == pmu.HARDWARE_COUNTERS and c.label.startswith("LLC misses")


@pytest.mark.parametrize("family,model,umask", [(0x17, 0x31, 0x58), (0x19, 0x01, 0x5c),
                                                (0x19, 0x11, 0xdc), (0x1a, 0x02, 0xdc)])
def test_zen_counts_l3_misses_by_raw_event_not_the_generic_l2_one(tmp_path, monkeypatch,
                                                                   family, model, umask):
    """amd_zen*_perfmon_event_map maps cache-misses to an L2 event; rswap opens the core PMU's
    ls_dmnd_fills_from_sys (0x43) with the beyond-L3 sources as a raw event."""
    _host(tmp_path, monkeypatch, vendor="AuthenticAMD", family=family, model=model)
    c = pmu_events.select_events()
    (mt, mc), (rt, rc) = c.counters
    assert mt == rt == pmu_events.PERF_TYPE_RAW
    assert mc == umask << 8 | 0x43 and rc == (umask | 0x02) << 8 | 0x43
    assert c.label.startswith("L3 misses") and "L2" not in c.label


def test_zen_unknown_family_keeps_the_generic_event_and_calls_it_l2(tmp_path, monkeypatch):
    _host(tmp_path, monkeypatch, vendor="AuthenticAMD", family=0x15, model=2)
    c = pmu_events.select_events()
    assert c.counters == pmu.HARDWARE_COUNTERS and c.label.startswith("L2 misses")


def test_hybrid_intel_opens_cpu_core_and_cpu_atom_by_their_type(tmp_path, monkeypatch):
    """No ``cpu`` PMU: each of cpu_core/cpu_atom has its own type and CPUs (intel-hybrid.txt)."""
    _host(tmp_path, monkeypatch, pmus=("cpu_core", "cpu_atom"), online="0-15",
          cpus={"cpu_core": "0-7", "cpu_atom": "8-15"})
    assert pmu.pmu_available()
    c = pmu_events.select_events()
    assert c.hybrid and [g.pmu for g in c.groups] == ["cpu_core", "cpu_atom"]
    core, atom = c.groups
    assert (core.misses.type, atom.misses.type) == (8, 9)
    assert core.misses.config == atom.misses.config == pmu_events.INTEL_LLC_MISSES
    assert core.cpus == tuple(range(8)) and atom.cpus == tuple(range(8, 16))


def test_hybrid_collector_opens_each_cpu_on_its_own_pmu(tmp_path, monkeypatch):
    _host(tmp_path, monkeypatch, pmus=("cpu_core", "cpu_atom"), online="0-3",
          cpus={"cpu_core": "0-1", "cpu_atom": "2-3"})
    opened = []

    class Table:
        def __init__(self, name):
            self.name = name

        def _open_perf_event(self, cpu, typ, config):
            opened.append((self.name, cpu, typ, config))

    col = pmu.PmuCollector(pin=False)
    col.choice = pmu_events.select_events()
    col._bpf = {n: Table(n) for n in ("rswap_pmu_misses", "rswap_pmu_refs")}
    col._open_counters()
    misses = sorted(o[1:] for o in opened if o[0] == "rswap_pmu_misses")
    assert misses == [(0, 8, 0x412e), (1, 8, 0x412e), (2, 9, 0x412e), (3, 9, 0x412e)]


def test_per_cpu_arrays_are_sized_by_cpu_ids_not_the_count(tmp_path, monkeypatch):
    """online "0-1,6-7": four CPUs, but bcc keys the perf array by id, so it needs 8 entries."""
    _host(tmp_path, monkeypatch, online="0-1,6-7", possible="0-7")
    assert pmu_events.online_cpus() == (0, 1, 6, 7)
    assert pmu_events.cpu_id_limit() == 8
    _host(tmp_path, monkeypatch, online="0,2", possible="0,2")
    assert pmu_events.cpu_id_limit() == 3
    assert pmu_events.parse_cpu_list("0-3,8,10-11\n") == (0, 1, 2, 3, 8, 10, 11)


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
