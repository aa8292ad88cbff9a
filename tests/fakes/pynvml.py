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

Where NVML fails (NVML API reference, NVIDIA's MIG and MPS user guides, and pynvml itself):

- ``FakeGpu(no_permission=True)``: ``nvmlDeviceGetHandleByIndex`` raises
  ``NVMLError_NoPermission`` for that device only ("the user doesn't have permission to talk to
  this device");
- ``FakeNvml(mismatch=True)``: the unversioned process-list calls raise
  ``pynvml.NVMLLibraryMismatchError`` - a plain ``Exception``, not an ``NVMLError`` - as
  pynvml's ``throwOnVersionMismatch`` does when the driver's libnvidia-ml lacks the ``_v3``
  symbol (FunctionNotFound);
- ``FakeGpu(mig=[FakeMig(...), ...])``: MIG enabled (``nvmlDeviceGetMigMode`` -> [1, 1];
  ``mig=[]`` enabled with no instances; ``mig=None`` and ``mig_capable=False``: NotSupported).
  ``nvmlDeviceGetMaxMigDeviceCount`` is 7; ``nvmlDeviceGetMigDeviceHandleByIndex`` raises
  ``NVMLError_NotFound`` for an empty slot.  A MIG handle has its own UUID (``MIG-…``), memory
  and processes; utilisation and process utilisation are NotSupported on it.  The parent's
  memory info is the whole GPU's, and its process list gives no memory per process
  (``usedGpuMemory`` None, as unprivileged callers see it);
- ``FakeGpu(mps_clients={pid: bytes})``: an MPS server holds the clients' memory: the compute
  list shows the server (``mps_server_pid``) with their sum, and
  ``nvmlDeviceGetMPSComputeRunningProcesses`` lists the clients.
"""
from __future__ import annotations

import itertools
import types
from dataclasses import dataclass, field

import pynvml as _real

NVMLError = _real.NVMLError


@dataclass
class FakeMig:
    """One MIG instance (a GPU instance with one compute instance)."""

    uuid: str
    total: int = 10 * 2**30
    name: str = "NVIDIA H100 80GB HBM3 MIG 1g.10gb"
    processes: dict[int, int | None] = field(default_factory=dict)
    reserved: int = 64 * 2**20

    @property
    def used(self) -> int:
        return self.reserved + sum(b or 0 for b in self.processes.values())


@dataclass
class FakeGpu:
    name: str = "NVIDIA H100 80GB HBM3"
    total: int = 80 * 2**30
    util_gpu: int = 0
    util_mem: int = 0
    processes: dict[int, int | None] = field(default_factory=dict)  # pid -> bytes
    sm_util: dict[int, int] = field(default_factory=dict)           # pid -> percent
    reserved: int = 512 * 2**20                                      # driver/context overhead
    uuid: str | None = None              # None: GPU-00000000-0000-0000-0000-<index>
    no_permission: bool = False
    mig: list[FakeMig] | None = None     # not None: MIG mode enabled with these instances
    mig_capable: bool = True
    mps_clients: dict[int, int] = field(default_factory=dict)      # pid -> bytes
    mps_server_pid: int = 4242

    @property
    def used(self) -> int:
        if self.mig is not None:
            return self.reserved + sum(m.used for m in self.mig)
        return (self.reserved + sum(b or 0 for b in self.processes.values())
                + sum(self.mps_clients.values()))


class FakeNvml(types.ModuleType):
    def __init__(self, gpus=(), driver: bool = True, library: bool = True,
                 mismatch: bool = False):
        super().__init__("pynvml")
        self.gpus = list(gpus)
        self.driver = driver
        self.library = library
        self.mismatch = mismatch
        self.NVMLLibraryMismatchError = _real.NVMLLibraryMismatchError
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

    def _target(self, handle):
        """The FakeGpu or, for a MIG handle, the FakeMig it names."""
        g = self._gpu(handle)
        if handle.mig is None:
            return g
        if g.mig is None or handle.mig >= len(g.mig):
            raise NVMLError(_real.NVML_ERROR_INVALID_ARGUMENT)
        return g.mig[handle.mig]

    @staticmethod
    def _proc(pid, used, gi=0xFFFFFFFF, ci=0xFFFFFFFF):
        return _real.nvmlFriendlyObject({"pid": pid, "usedGpuMemory": used,
                                         "gpuInstanceId": gi, "computeInstanceId": ci})

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
        if self.gpus[index].no_permission:
            raise NVMLError(_real.NVML_ERROR_NO_PERMISSION)
        return _Handle(index)

    def nvmlDeviceGetName(self, handle):
        return self._target(handle).name

    def nvmlDeviceGetUUID(self, handle):
        t = self._target(handle)
        if handle.mig is not None:
            return t.uuid
        return t.uuid or f"GPU-00000000-0000-0000-0000-{handle.index:012d}"

    def nvmlDeviceGetMemoryInfo(self, handle, version=None):
        t = self._target(handle)
        m = _real.c_nvmlMemory_t()
        m.total, m.used, m.free = t.total, t.used, t.total - t.used
        return m

    def nvmlDeviceGetUtilizationRates(self, handle):
        g = self._gpu(handle)
        if handle.mig is not None:
            raise NVMLError(_real.NVML_ERROR_NOT_SUPPORTED)
        u = _real.c_nvmlUtilization_t()
        u.gpu, u.memory = g.util_gpu, g.util_mem
        return u

    # -- MIG ----------------------------------------------------------------------------
    def nvmlDeviceGetMigMode(self, device):
        g = self._gpu(device)
        if device.mig is not None or not g.mig_capable:
            raise NVMLError(_real.NVML_ERROR_NOT_SUPPORTED)
        mode = _real.NVML_DEVICE_MIG_ENABLE if g.mig is not None else _real.NVML_DEVICE_MIG_DISABLE
        return [mode, mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, device):
        g = self._gpu(device)
        return 7 if g.mig_capable and device.mig is None else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(self, device, index):
        g = self._gpu(device)
        if g.mig is None or device.mig is not None:
            raise NVMLError(_real.NVML_ERROR_INVALID_ARGUMENT)
        if not 0 <= index < len(g.mig):
            raise NVMLError(_real.NVML_ERROR_NOT_FOUND)
        return _Handle(device.index, index)

    def nvmlDeviceIsMigDeviceHandle(self, device):
        self._gpu(device)
        return int(device.mig is not None)

    # -- processes ----------------------------------------------------------------------
    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        t = self._target(handle)
        if self.mismatch:
            raise _real.NVMLLibraryMismatchError(
                "Unversioned function called and the pyNVML version does not match the NVML "
                "lib version. Either use matching pyNVML and NVML lib versions or use a "
                "versioned function such as nvmlDeviceGetComputeRunningProcesses_v2")
        if handle.mig is None and t.mig is not None:
            # The parent of MIG instances: every instance's processes, without memory.
            return [self._proc(pid, None, gi, 0) for gi, m in enumerate(t.mig)
                    for pid in sorted(m.processes)]
        out = [self._proc(pid, used, *(() if handle.mig is None else (handle.mig, 0)))
               for pid, used in sorted(t.processes.items())]
        if handle.mig is None and t.mps_clients:
            out.append(self._proc(t.mps_server_pid, sum(t.mps_clients.values())))
        return out

    def nvmlDeviceGetMPSComputeRunningProcesses(self, handle):
        t = self._target(handle)
        if self.mismatch:
            raise _real.NVMLLibraryMismatchError("Unversioned function called and the pyNVML "
                                                 "version does not match the NVML lib version.")
        clients = getattr(t, "mps_clients", {})
        return [self._proc(pid, used) for pid, used in sorted(clients.items())]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle):
        self._target(handle)
        if self.mismatch:
            raise _real.NVMLLibraryMismatchError("Unversioned function called and the pyNVML "
                                                 "version does not match the NVML lib version.")
        return []

    def nvmlDeviceGetProcessUtilization(self, handle, timeStamp):
        if handle.mig is not None:
            self._target(handle)
            raise NVMLError(_real.NVML_ERROR_NOT_SUPPORTED)
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
    mig: int | None = None   # a MIG device handle: its slot on GPU ``index``
