"""GPU sensing and admission against a fake NVML that follows pynvml's signatures and raises
pynvml's own error classes (tests/fakes/pynvml.py)."""
from __future__ import annotations

import pytest

import pynvml

from rswap_ebpf.host.gpu.driver import GpuDriver
from rswap_ebpf.host.cgroup import TaskCgroup
from rswap_ebpf.errors import FeatureMissing
from rswap_ebpf.host.gpu.nvml import NvmlCollector
from tests.fakes.pynvml import FakeGpu, FakeMig, FakeNvml

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
        u0, u1 = (d.uuid for d in drv.last.devices)
        assert drv.admit("train", 7 * GiB) == u1         # only device 1 has 7 GiB free
        assert drv.admit("infer", 5 * GiB) == u0         # device 1's room is reserved now
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
        assert drv.advice[-1].fits and drv.advice[-1].device == u1
        drv.apply(tasks["infer"], 12 * GiB)
        assert not drv.advice[-1].fits
    finally:
        drv.close()


# -- where NVML fails, and the caps that exist (MIG, MPS) -------------------------------------

def test_mismatch_error_on_process_lists_reports_them_missing_and_starts(tmp_path):
    """pynvml raises NVMLLibraryMismatchError (an Exception, not an NVMLError) from the
    process-list calls on a driver without the _v3 symbol: start-up goes on, device memory is
    still sensed, per-task memory is missing (not zero)."""
    assert not issubclass(pynvml.NVMLLibraryMismatchError, pynvml.NVMLError)
    g0 = FakeGpu(total=16 * GiB, processes={10: 3 * GiB})
    drv = GpuDriver(NvmlCollector(FakeNvml([g0], mismatch=True)))
    drv.open()
    try:
        assert "do not match" in drv.last.processes_missing
        assert drv.last.devices[0].free_bytes == 16 * GiB - 3 * GiB - g0.reserved
        assert drv.measure({"t": _cg(tmp_path, "t", [10])}) == {}
        assert drv.fit("t", 4 * GiB).fits            # admission on device memory still works
    finally:
        drv.close()


def test_no_permission_on_one_device_marks_only_that_device_missing():
    gpus = [FakeGpu(total=16 * GiB), FakeGpu(total=24 * GiB, no_permission=True),
            FakeGpu(total=8 * GiB)]
    with NvmlCollector(FakeNvml(gpus)) as col:
        s = col.drain()
        assert [d.index for d in s.devices] == [0, 2]
        assert list(col.missing) == ["GPU 1"] and "Insufficient Permissions" in col.missing["GPU 1"]
    with pytest.raises(FeatureMissing) as exc:   # every device refused: the GPU is missing
        NvmlCollector(FakeNvml([FakeGpu(no_permission=True)])).open()
    assert "Insufficient Permissions" in str(exc.value)


def _mig_gpu():
    return FakeGpu(total=80 * GiB, uuid="GPU-aaaaaaaa-0000-0000-0000-000000000000",
                   mig=[FakeMig("MIG-11111111-0000-0000-0000-000000000000", total=40 * GiB,
                                processes={30: 5 * GiB}),
                        FakeMig("MIG-22222222-0000-0000-0000-000000000000", total=10 * GiB),
                        FakeMig("MIG-33333333-0000-0000-0000-000000000000", total=20 * GiB)])


def test_mig_instances_are_devices_of_their_own(tmp_path):
    with NvmlCollector(FakeNvml([_mig_gpu(), FakeGpu(total=16 * GiB)])) as col:
        s = col.drain()
        parent = s.device("GPU-aaaaaaaa-0000-0000-0000-000000000000")
        assert parent.mig_mode and not parent.placeable
        migs = [d for d in s.devices if d.mig_parent == parent.uuid]
        assert [d.total_bytes for d in migs] == [40 * GiB, 10 * GiB, 20 * GiB]
        assert all(d.uuid.startswith("MIG-") and d.index == 0 for d in migs)
        by_pid = {p.pid: p for p in s.processes}
        assert by_pid[30].device == migs[0].uuid and by_pid[30].used_bytes == 5 * GiB


def test_mig_admission_uses_the_instance_memory_and_names_it_by_uuid(tmp_path):
    """Under MIG a process uses one MIG device: admission counts that instance's memory (not the
    parent's 80 GiB), picks the smallest instance that fits (its memory is the cap) and sets
    CUDA_VISIBLE_DEVICES=MIG-<UUID>."""
    drv = GpuDriver(NvmlCollector(FakeNvml([_mig_gpu()])))
    drv.open()
    try:
        assert drv.total() == 70 * GiB                      # the instances, not 80 + 70
        p = drv.place("small", 8 * GiB)
        assert p.device == "MIG-22222222-0000-0000-0000-000000000000"
        assert p.enforced_by == "MIG instance" and p.cap_bytes == 10 * GiB
        assert p.env() == {"CUDA_VISIBLE_DEVICES": "MIG-22222222-0000-0000-0000-000000000000"}
        p = drv.place("mid", 8 * GiB)                       # the 10 GiB one is reserved now
        assert p.device == "MIG-33333333-0000-0000-0000-000000000000"
        big = drv.fit("big", 50 * GiB)                      # no instance has 50 GiB
        assert not big.fits and big.room_bytes < 40 * GiB
    finally:
        drv.close()


def test_mps_clients_are_read_and_capped_by_the_pinned_memory_limit(tmp_path):
    """MPS: the compute list shows the server; clients come from
    nvmlDeviceGetMPSComputeRunningProcesses.  A task placed on an MPS device gets
    CUDA_MPS_PINNED_DEVICE_MEM_LIMIT for the one device it sees."""
    g = FakeGpu(total=16 * GiB, mps_clients={40: 2 * GiB, 41: 1 * GiB})
    drv = GpuDriver(NvmlCollector(FakeNvml([g])))
    drv.open()
    try:
        s = drv.last
        clients = {p.pid: p for p in s.processes if p.mps_client}
        assert {40: 2 * GiB, 41: 1 * GiB} == {k: v.used_bytes for k, v in clients.items()}
        assert s.devices[0].mps
        assert drv.measure({"a": _cg(tmp_path, "a", [40]), "b": _cg(tmp_path, "b", [41])}) == \
            {"a": 2 * GiB, "b": 1 * GiB}
        p = drv.place("c", 3 * GiB + 1)
        assert p.enforced_by == "MPS pinned memory limit"
        assert p.env() == {"CUDA_VISIBLE_DEVICES": s.devices[0].uuid,
                           "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=3073M"}
    finally:
        drv.close()
    # No client yet (the server starts with the first one): configured MPS sets the cap too.
    drv = GpuDriver(NvmlCollector(FakeNvml([FakeGpu(total=16 * GiB)])), mps=True)
    drv.open()
    try:
        assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" in drv.fit("d", GiB).env()
    finally:
        drv.close()
    drv = GpuDriver(NvmlCollector(FakeNvml([FakeGpu(total=16 * GiB)])))
    drv.open()
    try:
        p = drv.fit("e", GiB)
        assert p.enforced_by == "admission only" and "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in p.env()
    finally:
        drv.close()


def test_devices_may_be_chosen_by_uuid():
    gpus = [FakeGpu(total=16 * GiB), _mig_gpu()]
    with NvmlCollector(FakeNvml(gpus), devices=["GPU-aaaaaaaa-0000-0000-0000-000000000000"]) as col:
        uuids = [d.uuid for d in col.drain().devices]
        assert uuids[0] == "GPU-aaaaaaaa-0000-0000-0000-000000000000" and len(uuids) == 4
    with pytest.raises(FeatureMissing):
        NvmlCollector(FakeNvml(gpus), devices=["GPU-nope"]).open()


def test_config_takes_gpu_uuids_and_the_mps_switch():
    from rswap_ebpf.errors import ConfigError
    from rswap_ebpf.model.resources import ResourceType
    from rswap_ebpf.runtime import config

    cfg = config.parse('[resources.gpu_memory]\ntotal = "auto"\nmps = true\n'
                       'devices = ["MIG-11111111-0000-0000-0000-000000000000", 1]\n')
    assert cfg.options[ResourceType.GPU_MEMORY] == {
        "devices": ("MIG-11111111-0000-0000-0000-000000000000", 1), "mps": True}
    with pytest.raises(ConfigError):
        config.parse('[resources.gpu_memory]\ntotal = "auto"\ndevices = ["gpu0"]\n')
