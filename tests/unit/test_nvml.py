"""GPU sensing and admission against a fake NVML that follows pynvml's signatures and raises
pynvml's own error classes (tests/fakes/pynvml.py)."""
from __future__ import annotations

import pytest

import pynvml

from rswap_ebpf.host.gpu.driver import GpuDriver
from rswap_ebpf.host.cgroup import TaskCgroup
from rswap_ebpf.errors import FeatureMissing
from rswap_ebpf.host.gpu.nvml import NvmlCollector
from tests.fakes.pynvml import FakeGpu, FakeNvml

GiB = 2**30


def test_fake_follows_pynvml_errors():
    nv = FakeNvml([FakeGpu()])
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        nv.nvmlDeviceGetCount()
    with pytest.raises(pynvml.NVMLError_DriverNotLoaded):
        FakeNvml(driver=False).nvmlInit()
    nv.nvmlInit()
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        nv.nvmlDeviceGetHandleByIndex(3)
    with pytest.raises(pynvml.NVMLError_NotFound):
        nv.nvmlDeviceGetProcessUtilization(nv.nvmlDeviceGetHandleByIndex(0), 0)
    assert isinstance(nv.nvmlDeviceGetMemoryInfo(nv.nvmlDeviceGetHandleByIndex(0)),
                      pynvml.c_nvmlMemory_t)


def test_devices_and_processes_are_sensed():
    g0 = FakeGpu(total=16 * GiB, util_gpu=70, util_mem=40, processes={10: 3 * GiB, 11: None},
                 sm_util={10: 65})
    g1 = FakeGpu(total=24 * GiB, processes={12: 1 * GiB})
    with NvmlCollector(FakeNvml([g0, g1])) as col:
        s = col.drain()
        assert [d.index for d in s.devices] == [0, 1]
        d0 = s.device(0)
        assert (d0.total_bytes, d0.util_gpu_pct, d0.util_mem_pct) == (16 * GiB, 70, 40)
        assert d0.free_bytes == 16 * GiB - 3 * GiB - g0.reserved
        by_pid = {p.pid: p for p in s.processes}
        assert by_pid[10].used_bytes == 3 * GiB and by_pid[10].sm_util_pct == 65
        assert by_pid[11].used_bytes is None  # NVML could not say: unknown, not zero
        assert s.used_by({10, 11, 12}) == 4 * GiB
        # Process samples are read incrementally: nothing new -> no utilisation, no error.
        assert {p.pid: p.sm_util_pct for p in col.drain().processes}[10] in (None, 65)


@pytest.mark.parametrize("kw", [{"driver": False}, {"library": False}])
def test_no_driver_is_missing_not_an_exception(kw):
    with pytest.raises(FeatureMissing) as exc:
        NvmlCollector(FakeNvml([FakeGpu()], **kw)).open()
    assert "NVML" in str(exc.value)


def test_real_pynvml_on_this_host_is_missing_or_works():
    """This host (and CI) has no NVIDIA driver: the real module must give FeatureMissing."""
    try:
        col = NvmlCollector().open()
    except FeatureMissing as err:
        assert "nvmlInit" in str(err)
    else:  # a GPU host: then it must sense something
        try:
            assert col.drain().devices
        finally:
            col.close()


def _cg(tmp_path, name, pids):
    d = tmp_path / name
    d.mkdir()
    (d / "cgroup.procs").write_text("".join(f"{p}\n" for p in pids))
    return TaskCgroup(name, name, {"unified": str(d)}, False)


def test_admission_places_only_what_fits(tmp_path):
    g0 = FakeGpu(total=16 * GiB, processes={10: 10 * GiB})
    g1 = FakeGpu(total=8 * GiB)
    drv = GpuDriver(NvmlCollector(FakeNvml([g0, g1])))
    drv.open()
    try:
        assert drv.total() == 24 * GiB
        free0 = 16 * GiB - 10 * GiB - g0.reserved
        free1 = 8 * GiB - g1.reserved
        assert drv.admit("train", 7 * GiB) == 1          # only device 1 has 7 GiB free
        assert drv.admit("infer", 5 * GiB) == 0          # device 1's room is reserved now
        assert drv.admit("huge", 9 * GiB) is None         # fits nowhere: not started
        assert drv.headroom(1) == free1 - 7 * GiB
        # The task starts using its memory: the reservation is no longer counted twice.
        g1.processes[20] = 6 * GiB
        tasks = {"train": _cg(tmp_path, "train", [20]), "infer": _cg(tmp_path, "infer", [21])}
        used = drv.measure(tasks)
        assert used == {"train": 6 * GiB, "infer": 0.0}
        assert drv.headroom(1) == free1 - 6 * GiB - 1 * GiB
        assert drv.headroom(0) == free0 - 5 * GiB
        # A swap decided by the manager is advice, and nothing is written.
        assert drv.apply(tasks["train"], 6 * GiB + 512 * 2**20) == []
        assert drv.advice[-1].fits and drv.advice[-1].device == 1
        drv.apply(tasks["infer"], 12 * GiB)
        assert not drv.advice[-1].fits
    finally:
        drv.close()
