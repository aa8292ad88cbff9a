"""GPU memory and utilisation per device and per process, through NVML (``pynvml``).

NVML reports, per device, total/free/used memory and utilisation, and per process the memory it
holds and (where supported) its SM utilisation.  A host without the NVIDIA driver or library
raises :class:`FeatureMissing` from :meth:`NvmlCollector.open`, never an NVML exception, so the
GPU resource reports ``missing`` and the others keep working.

The module is injectable (``nvml=``) so the tests run the same code against a fake that follows
pynvml's signatures and error types.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from rswap_ebpf.errors import FeatureMissing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuDevice:
    index: int
    uuid: str
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    util_gpu_pct: int
    util_mem_pct: int


@dataclass(frozen=True)
class GpuProcess:
    device: int
    pid: int
    used_bytes: int | None   # None: NVML cannot attribute memory (WDDM, some MIG setups)
    sm_util_pct: int | None  # None: no sample since the last read, or not supported


@dataclass(frozen=True)
class GpuSample:
    devices: tuple[GpuDevice, ...]
    processes: tuple[GpuProcess, ...]

    def used_by(self, pids: set[int]) -> int:
        return sum(p.used_bytes or 0 for p in self.processes if p.pid in pids)

    def device(self, index: int) -> GpuDevice:
        return next(d for d in self.devices if d.index == index)


def import_nvml():
    try:
        import pynvml
    except ImportError as err:
        raise FeatureMissing("NVML", f"pynvml does not import ({err})",
                             "pip install nvidia-ml-py (a dependency of rswap)") from None
    return pynvml


class NvmlCollector:
    """Reads every selected device and its processes on each drain."""

    def __init__(self, nvml=None, devices: Sequence[int] | None = None):
        self._nvml = nvml
        self.device_filter = tuple(devices) if devices is not None else None
        self._handles: dict[int, object] = {}
        self._last_ts: dict[int, int] = {}
        self._open = False

    @property
    def nvml(self):
        if self._nvml is None:
            self._nvml = import_nvml()
        return self._nvml

    def open(self) -> NvmlCollector:
        nv = self.nvml
        try:
            nv.nvmlInit()
        except nv.NVMLError as err:
            raise FeatureMissing("NVML", f"nvmlInit failed: {err} (no NVIDIA driver on this host?)",
                                 "install the NVIDIA driver (libnvidia-ml.so.1)") from None
        self._open = True
        try:
            count = nv.nvmlDeviceGetCount()
            wanted = self.device_filter if self.device_filter is not None else range(count)
            for i in wanted:
                if not 0 <= i < count:
                    raise FeatureMissing("GPU", f"device {i} does not exist ({count} GPU(s))",
                                         "fix resources.gpu_memory.devices")
                self._handles[i] = nv.nvmlDeviceGetHandleByIndex(i)
        except nv.NVMLError as err:
            self.close()
            raise FeatureMissing("NVML", f"cannot enumerate GPUs: {err}") from None
        except BaseException:
            self.close()
            raise
        if not self._handles:
            self.close()
            raise FeatureMissing("GPU", "NVML sees no GPU on this host")
        return self

    def drain(self) -> GpuSample:
        if not self._open:
            raise RuntimeError("collector is not open")
        nv = self.nvml
        devices, procs = [], []
        for i, h in self._handles.items():
            try:
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                util = _optional(nv, nv.nvmlDeviceGetUtilizationRates, h)
                devices.append(GpuDevice(i, _text(nv.nvmlDeviceGetUUID(h)),
                                         _text(nv.nvmlDeviceGetName(h)), int(mem.total),
                                         int(mem.free), int(mem.used),
                                         int(util.gpu) if util else 0,
                                         int(util.memory) if util else 0))
                running = list(nv.nvmlDeviceGetComputeRunningProcesses(h)) + list(
                    _optional(nv, nv.nvmlDeviceGetGraphicsRunningProcesses, h) or [])
                sm = self._process_util(nv, i, h)
            except nv.NVMLError as err:
                # A GPU that fell off the bus must not stop the tick: leave it out, say so.
                log.warning("GPU %d: %s", i, err)
                continue
            seen: dict[int, int | None] = {}
            for p in running:
                used = p.usedGpuMemory
                seen[p.pid] = (seen.get(p.pid) or 0) + used if used is not None else seen.get(p.pid)
            for pid, used in seen.items():
                procs.append(GpuProcess(i, int(pid), used, sm.get(pid)))
        return GpuSample(tuple(devices), tuple(procs))

    def _process_util(self, nv, i: int, h) -> dict[int, int]:
        try:
            samples = nv.nvmlDeviceGetProcessUtilization(h, self._last_ts.get(i, 0))
        except nv.NVMLError:  # NotFound: no sample since last time; NotSupported: older GPUs
            return {}
        out: dict[int, int] = {}
        for s in samples:
            out[int(s.pid)] = max(out.get(int(s.pid), 0), int(s.smUtil))
            self._last_ts[i] = max(self._last_ts.get(i, 0), int(s.timeStamp))
        return out

    def close(self) -> None:
        if self._open:
            try:
                self.nvml.nvmlShutdown()
            except self.nvml.NVMLError as err:
                log.warning("nvmlShutdown: %s", err)
            self._open = False
        self._handles.clear()

    def __enter__(self) -> NvmlCollector:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()


def _optional(nv, fn, h):
    try:
        return fn(h)
    except nv.NVMLError_NotSupported:
        return None


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
