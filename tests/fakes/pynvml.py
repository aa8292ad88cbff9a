"""A stand-in for the ``pynvml`` module (NVIDIA's nvidia-ml-py bindings) with simulated GPUs.

It follows the real module's function signatures and return types, and raises the real module's
error classes (``pynvml.NVMLError`` maps each ``NVML_ERROR_*`` code to a subclass such as
``NVMLError_DriverNotLoaded``), so code written against it runs unchanged on pynvml:

- ``nvmlInit()`` / ``nvmlShutdown()`` (reference counted, like the library);
  every other call before init raises ``NVMLError_Uninitialized``;
- ``nvmlDeviceGetCount()``, ``nvmlDeviceGetHandleByIndex(index)`` (``NVMLError_InvalidArgument``
  for a bad index), ``nvmlDeviceGetName(handle)``, ``nvmlDeviceGetUUID(handle)`` (str, as
  ``@convertStrBytes`` returns on Python 3);
- ``nvmlDeviceGetMemoryInfo(handle, version=None)`` -> ``c_nvmlMemory_t`` (total/free/used bytes);
- ``nvmlDeviceGetUtilizationRates(handle)`` -> ``c_nvmlUtilization_t`` (gpu/memory percent);
- ``nvmlDeviceGetComputeRunningProcesses(handle)`` and ``...GraphicsRunningProcesses`` ->
  friendly objects with ``pid``, ``usedGpuMemory`` (None when NVML cannot say, as under WDDM),
  ``gpuInstanceId``, ``computeInstanceId``;
- ``nvmlDeviceGetProcessUtilization(handle, timeStamp)`` -> ``c_nvmlProcessUtilizationSample_t``
  list of samples newer than ``timeStamp``; ``NVMLError_NotFound`` when there are none (what the
  library returns).

``FakeNvml(driver=False)`` behaves like a host without the NVIDIA driver: ``nvmlInit`` raises
``NVMLError_DriverNotLoaded`` (``library=False``: ``NVMLError_LibraryNotFound``).
"""
from __future__ import annotations

import itertools
import types
from dataclasses import dataclass, field

import pynvml as _real

NVMLError = _real.NVMLError


@dataclass
class FakeGpu:
    name: str = "NVIDIA H100 80GB HBM3"
    total: int = 80 * 2**30
    util_gpu: int = 0
    util_mem: int = 0
    processes: dict[int, int | None] = field(default_factory=dict)  # pid -> bytes
    sm_util: dict[int, int] = field(default_factory=dict)           # pid -> percent
    reserved: int = 512 * 2**20                                      # driver/context overhead

    @property
    def used(self) -> int:
        return self.reserved + sum(b or 0 for b in self.processes.values())


class FakeNvml(types.ModuleType):
    def __init__(self, gpus=(), driver: bool = True, library: bool = True):
        super().__init__("pynvml")
        self.gpus = list(gpus)
        self.driver = driver
        self.library = library
        self._inits = 0
        self._clock = itertools.count(1_000_000, 1_000)
        # The real module's error classes and constants, so `except pynvml.NVMLError_X` works.
        for name in dir(_real):
            if name.startswith(("NVMLError", "NVML_ERROR_", "NVML_SUCCESS")):
                setattr(self, name, getattr(_real, name))

    def _check(self) -> None:
        if self._inits == 0:
            raise NVMLError(_real.NVML_ERROR_UNINITIALIZED)

    def _gpu(self, handle) -> FakeGpu:
        self._check()
        if not isinstance(handle, _Handle) or handle.index >= len(self.gpus):
            raise NVMLError(_real.NVML_ERROR_INVALID_ARGUMENT)
        return self.gpus[handle.index]

    # -- the pynvml API ---------------------------------------------------------------------
    def nvmlInit(self):
        if not self.library:
            raise NVMLError(_real.NVML_ERROR_LIBRARY_NOT_FOUND)
        if not self.driver:
            raise NVMLError(_real.NVML_ERROR_DRIVER_NOT_LOADED)
        self._inits += 1

    def nvmlShutdown(self):
        self._check()
        self._inits -= 1

    def nvmlDeviceGetCount(self):
        self._check()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        self._check()
        if not 0 <= index < len(self.gpus):
            raise NVMLError(_real.NVML_ERROR_INVALID_ARGUMENT)
        return _Handle(index)

    def nvmlDeviceGetName(self, handle):
        return self._gpu(handle).name

    def nvmlDeviceGetUUID(self, handle):
        self._gpu(handle)
        return f"GPU-00000000-0000-0000-0000-{handle.index:012d}"

    def nvmlDeviceGetMemoryInfo(self, handle, version=None):
        g = self._gpu(handle)
        m = _real.c_nvmlMemory_t()
        m.total, m.used, m.free = g.total, g.used, g.total - g.used
        return m

    def nvmlDeviceGetUtilizationRates(self, handle):
        g = self._gpu(handle)
        u = _real.c_nvmlUtilization_t()
        u.gpu, u.memory = g.util_gpu, g.util_mem
        return u

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        g = self._gpu(handle)
        out = []
        for pid, used in sorted(g.processes.items()):
            out.append(_real.nvmlFriendlyObject({"pid": pid, "usedGpuMemory": used,
                                                 "gpuInstanceId": 0xFFFFFFFF,
                                                 "computeInstanceId": 0xFFFFFFFF}))
        return out

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle):
        self._gpu(handle)
        return []

    def nvmlDeviceGetProcessUtilization(self, handle, timeStamp):
        g = self._gpu(handle)
        now = next(self._clock)
        samples = []
        for pid, sm in sorted(g.sm_util.items()):
            s = _real.c_nvmlProcessUtilizationSample_t()
            s.pid, s.timeStamp, s.smUtil, s.memUtil = pid, now, sm, 0
            if s.timeStamp > timeStamp:
                samples.append(s)
        if not samples:
            raise NVMLError(_real.NVML_ERROR_NOT_FOUND)
        return samples


@dataclass(frozen=True)
class _Handle:
    """Opaque like ``c_nvmlDevice_t``: callers only pass it back."""

    index: int
