"""``rswap doctor``'s hardware lines against fakes that follow the kernel's and NVML's documented
interfaces (tests/fakes/resctrl.py: resctrl.rst; tests/fakes/pynvml.py: pynvml and the NVML API;
the sysfs PMU tree as tests/unit/host/test_pmu.py lays it out)."""
from __future__ import annotations

from rswap_ebpf.cli import doctor
from tests.fakes.pynvml import FakeGpu, FakeMig, FakeNvml
from tests.fakes.resctrl import FakeResctrl
from tests.unit.host.test_pmu import _host

GiB = 2**30


def test_doctor_names_the_vendor_and_the_zen_l3_event(tmp_path, monkeypatch):
    _host(tmp_path, monkeypatch, vendor="AuthenticAMD", family=0x19, model=0x11,
          online="0-1,4-5", possible="0-7")
    c = doctor.check_pmu()
    assert c.status == "ok" and c.detail.startswith("amd family 0x19 model 0x11")
    assert "L3 misses" in c.detail and "sized 8 for online CPUs 0-1,4-5" in c.detail


def test_doctor_names_the_hybrid_pmus(tmp_path, monkeypatch):
    _host(tmp_path, monkeypatch, pmus=("cpu_core", "cpu_atom"), online="0-3",
          cpus={"cpu_core": "0-1", "cpu_atom": "2-3"})
    c = doctor.check_pmu()
    assert c.status == "ok" and "cpu_core (type 8, 2 CPUs), cpu_atom (type 9, 2 CPUs)" in c.detail


def test_doctor_without_a_pmu_still_names_the_vendor(tmp_path, monkeypatch):
    _host(tmp_path, monkeypatch, vendor="GenuineIntel", pmus=())
    c = doctor.check_pmu()
    assert c.status == "missing" and c.detail.startswith("intel family 0x6")


def test_doctor_names_resctrl_domains_cdp_and_the_mb_unit(tmp_path, monkeypatch):
    fake = FakeResctrl(str(tmp_path / "r"), cbm_mask="7ff", l3_domains=(0, 1), cdp=True,
                       shareable_bits="600")
    monkeypatch.setenv("RSWAP_RESCTRL_ROOT", fake.root)
    try:
        c = doctor.check_resctrl()
        assert c.status == "ok"
        assert "L3 11 ways in domains 0,1 with CDP" in c.detail
        assert "shareable_bits 600 (tasks get only the 9 ways" in c.detail
        assert "MB in percent (a throttle level, not a share of bandwidth" in c.detail
        assert "8 CLOSIDs" in c.detail and "224 RMIDs" in c.detail
    finally:
        fake.close()
    fake = FakeResctrl(str(tmp_path / "amd"), vendor="amd", l3_domains=(0,))
    monkeypatch.setenv("RSWAP_RESCTRL_ROOT", fake.root)
    try:
        c = doctor.check_resctrl()
        assert "CDP off" in c.detail and "sparse masks allowed, min_cbm_bits 0" in c.detail
        assert "MB in 1/8 GB/s (AMD) (a rate) per domain 0" in c.detail
    finally:
        fake.close()


def test_doctor_names_mig_mode_and_says_what_nvml_cannot_do():
    gpus = [FakeGpu(total=80 * GiB, uuid="GPU-aaaaaaaa-0000-0000-0000-000000000000",
                    mig=[FakeMig("MIG-11111111-0000-0000-0000-000000000000", total=40 * GiB)]),
            FakeGpu(total=16 * GiB, no_permission=True), FakeGpu(total=16 * GiB, mig_capable=False)]
    c = doctor.check_nvml(FakeNvml(gpus))
    assert c.status == "fallback"                       # one GPU refused
    assert "MIG on, 1 instance(s): MIG-11111111-0000-0000-0000-000000000000 40960 MiB" in c.detail
    assert "MIG off" in c.detail and "left out: GPU 1" in c.detail
    assert "NVML cannot cap a process's GPU memory" in c.detail
    c = doctor.check_nvml(FakeNvml([FakeGpu()], mismatch=True))
    assert c.status == "fallback" and "process lists unavailable" in c.detail
    c = doctor.check_nvml(FakeNvml(driver=False))
    assert c.status == "missing" and "NVML cannot cap" in c.detail
