"""GPU memory and utilisation per device and per process, through NVML (``pynvml``).

NVML reports, per device, total/free/used memory and utilisation, and per process the memory it
holds and (where supported) its SM utilisation.  A host without the NVIDIA driver or library
raises :class:`FeatureMissing` from :meth:`NvmlCollector.open`, never an NVML exception, so the
GPU resource reports ``missing`` and the others keep working.

Devices are named by UUID (``GPU-…``, and ``MIG-…`` for a MIG instance), the name CUDA accepts in
``CUDA_VISIBLE_DEVICES``: NVML's index need not be PCI order, nor CUDA's order.

Where NVML fails, as its documentation and pynvml say it does:

- one device refusing access (``NVMLError_NoPermission`` from ``nvmlDeviceGetHandleByIndex``, e.g.
  a device node the cgroup does not allow) leaves that device out, in :attr:`missing`; the others
  are used;
- the process lists raise ``pynvml.NVMLLibraryMismatchError`` (not an ``NVMLError``: pynvml's
  ``throwOnVersionMismatch`` turns FunctionNotFound into it when the driver lacks the ``_v3``
  call): per-process memory is reported missing (:attr:`GpuSample.processes_missing`), device
  memory is still read, start-up goes on;
- MIG (``nvmlDeviceGetMigMode`` current = 1): processes run on MIG instances, each with its own
  memory; the parent's memory is the instances' and is not offered for placement.  Each instance
  (``nvmlDeviceGetMigDeviceHandleByIndex``; NotFound for an empty slot) is a device of its own.
  Utilisation is not supported on MIG instances (NotSupported: left at 0);
- MPS: client processes are listed by ``nvmlDeviceGetMPSComputeRunningProcesses`` (the compute
  list shows the MPS server); a device with clients, or the MPS server among its processes, is
  marked ``mps``.

The module is injectable (``nvml=``) so the tests run the same code against a fake that follows
pynvml's signatures and error types.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from rswap_ebpf import paths
from rswap_ebpf.errors import FeatureMissing

log = logging.getLogger(__name__)

NVML_DEVICE_MIG_ENABLE = 1
MPS_SERVER_COMM = "nvidia-cuda-mps"   # /proc/<pid>/comm of nvidia-cuda-mps-server (15 chars)


@dataclass(frozen=True)
class GpuDevice:
    index: int                  # NVML index of the physical GPU (a MIG instance: its parent's)
    uuid: str                   # GPU-… or MIG-…: what CUDA_VISIBLE_DEVICES takes
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    util_gpu_pct: int
    util_mem_pct: int
    mig_parent: str | None = None   # a MIG instance: its GPU's UUID
    mig_mode: bool = False          # a GPU with MIG enabled: placement is on its instances
    mps: bool = False               # an MPS server serves clients on this device

    @property
    def placeable(self) -> bool:
        """Whether a task may be placed on it: a GPU without MIG, or a MIG instance."""
        return not self.mig_mode


@dataclass(frozen=True)
class GpuProcess:
    device: str              # the UUID of the device (or MIG instance) it runs on
    pid: int
    used_bytes: int | None   # None: NVML cannot attribute memory (WDDM, some MIG setups)
    sm_util_pct: int | None  # None: no sample since the last read, or not supported
    mps_client: bool = False


@dataclass(frozen=True)
class GpuSample:
    devices: tuple[GpuDevice, ...]
    processes: tuple[GpuProcess, ...]
    #: why per-process memory could not be read (None: it was); then used_by() means nothing
    processes_missing: str | None = None

    def used_by(self, pids: set[int]) -> int:
        return sum(p.used_bytes or 0 for p in self.processes if p.pid in pids)

    def device(self, key: int | str) -> GpuDevice:
        """By UUID, or by NVML index (the physical GPU)."""
        if isinstance(key, str):
            return next(d for d in self.devices if d.uuid == key)
        return next(d for d in self.devices if d.index == key and d.mig_parent is None)


def import_nvml():
    try:
        import pynvml
    except ImportError as err:
        raise FeatureMissing("NVML", f"pynvml does not import ({err})",
                             "pip install nvidia-ml-py (a dependency of rswap)") from None
    return pynvml


@dataclass
class _Handle:
    index: int
    uuid: str
    handle: object
    parent: str | None = None
    mig_mode: bool = False
    children: list[str] = field(default_factory=list)


class NvmlCollector:
    """Reads every selected device (GPUs and MIG instances) and its processes on each drain."""

    def __init__(self, nvml=None, devices: Sequence[int | str] | None = None):
        """``devices``: NVML indices or UUIDs to manage (None: all)."""
        self._nvml = nvml
        self.device_filter = tuple(devices) if devices is not None else None
        self._handles: dict[str, _Handle] = {}
        self._last_ts: dict[str, int] = {}
        self._open = False
        #: "GPU <index>" -> why NVML refused it (NoPermission, ...), left out of every sample
        self.missing: dict[str, str] = {}
        self.processes_missing: str | None = None

    @property
    def nvml(self):
        if self._nvml is None:
            self._nvml = import_nvml()
        return self._nvml

    @property
    def mismatch_error(self):
        return getattr(self.nvml, "NVMLLibraryMismatchError", None) or _NoSuchError

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
            for i in range(count):
                self._open_device(nv, i)
            if self.device_filter is not None:
                self._apply_filter(count)
        except nv.NVMLError as err:
            self.close()
            raise FeatureMissing("NVML", f"cannot enumerate GPUs: {err}") from None
        except BaseException:
            self.close()
            raise
        if not self._handles:
            why = "; ".join(f"{k}: {v}" for k, v in self.missing.items())
            self.close()
            raise FeatureMissing("GPU", "NVML sees no usable GPU on this host"
                                 + (f" ({why})" if why else ""))
        return self

    def _open_device(self, nv, i: int) -> None:
        try:
            h = nv.nvmlDeviceGetHandleByIndex(i)
            uuid = _text(nv.nvmlDeviceGetUUID(h))
        except nv.NVMLError as err:
            # NoPermission (or a GPU in a bad state) on this device only: the others still work.
            self.missing[f"GPU {i}"] = str(err)
            log.warning("GPU %d left out: %s", i, err)
            return
        dev = _Handle(i, uuid, h)
        try:
            dev.mig_mode = nv.nvmlDeviceGetMigMode(h)[0] == NVML_DEVICE_MIG_ENABLE
        except nv.NVMLError:  # NotSupported: a GPU without MIG
            dev.mig_mode = False
        self._handles[uuid] = dev
        if not dev.mig_mode:
            return
        for j in range(nv.nvmlDeviceGetMaxMigDeviceCount(h)):
            try:
                mh = nv.nvmlDeviceGetMigDeviceHandleByIndex(h, j)
                muuid = _text(nv.nvmlDeviceGetUUID(mh))
            except nv.NVMLError_NotFound:
                continue  # no instance in this slot
            self._handles[muuid] = _Handle(i, muuid, mh, parent=uuid)
            dev.children.append(muuid)

    def _apply_filter(self, count: int) -> None:
        keep: set[str] = set()
        for want in self.device_filter:
            if isinstance(want, int) or (isinstance(want, str) and want.isdigit()):
                idx = int(want)
                if not 0 <= idx < count:
                    raise FeatureMissing("GPU", f"device {idx} does not exist ({count} GPU(s))",
                                         "fix resources.gpu_memory.devices")
                hit = [u for u, h in self._handles.items() if h.index == idx]
            else:
                hit = [u for u, h in self._handles.items() if u == want or h.parent == want]
                if not hit:
                    raise FeatureMissing("GPU", f"no device {want} (NVML sees "
                                         f"{', '.join(self._handles) or 'none'})",
                                         "fix resources.gpu_memory.devices")
            for u in hit:
                keep.add(u)
                keep.update(self._handles[u].children)
        self._handles = {u: h for u, h in self._handles.items() if u in keep}

    def drain(self) -> GpuSample:
        if not self._open:
            raise RuntimeError("collector is not open")
        nv = self.nvml
        devices, procs = [], []
        for uuid, dev in self._handles.items():
            h = dev.handle
            try:
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                util = _optional(nv, nv.nvmlDeviceGetUtilizationRates, h)
                name = _text(nv.nvmlDeviceGetName(h))
                running, mps_clients = ([], []) if dev.mig_mode else self._processes(nv, h)
                sm = {} if dev.mig_mode or dev.parent else self._process_util(nv, uuid, h)
            except nv.NVMLError as err:
                # A GPU that fell off the bus must not stop the tick: leave it out, say so.
                log.warning("GPU %s: %s", uuid, err)
                continue
            mps = bool(mps_clients) or any(_is_mps_server(p.pid) for p in running)
            devices.append(GpuDevice(dev.index, uuid, name, int(mem.total), int(mem.free),
                                     int(mem.used), int(util.gpu) if util else 0,
                                     int(util.memory) if util else 0, dev.parent, dev.mig_mode,
                                     mps))
            for plist, client in ((running, False), (mps_clients, True)):
                seen: dict[int, int | None] = {}
                for p in plist:
                    used = p.usedGpuMemory
                    seen[p.pid] = ((seen.get(p.pid) or 0) + used if used is not None
                                   else seen.get(p.pid))
                for pid, used in seen.items():
                    procs.append(GpuProcess(uuid, int(pid), used, sm.get(pid), client))
        return GpuSample(tuple(devices), tuple(procs), self.processes_missing)

    def _processes(self, nv, h) -> tuple[list, list]:
        """Compute + graphics processes, and MPS clients; ([], []) once the library said the
        process calls do not match this driver."""
        if self.processes_missing is not None:
            return [], []
        try:
            running = list(nv.nvmlDeviceGetComputeRunningProcesses(h)) + list(
                _optional(nv, nv.nvmlDeviceGetGraphicsRunningProcesses, h) or [])
        except self.mismatch_error as err:
            self.processes_missing = (f"NVML process lists unavailable: {err} (pynvml and the "
                                      "driver's libnvidia-ml do not match)")
            log.warning("%s; GPU memory per task is not sensed, admission uses device memory",
                        self.processes_missing)
            return [], []
        fn = getattr(nv, "nvmlDeviceGetMPSComputeRunningProcesses", None)
        clients = []
        if fn is not None:
            try:
                clients = list(fn(h))
            except (nv.NVMLError, self.mismatch_error):  # NotSupported, or no such call
                clients = []
        return running, clients

    def _process_util(self, nv, uuid: str, h) -> dict[int, int]:
        try:
            samples = nv.nvmlDeviceGetProcessUtilization(h, self._last_ts.get(uuid, 0))
        except nv.NVMLError:  # NotFound: no sample since last time; NotSupported: older GPUs
            return {}
        out: dict[int, int] = {}
        for s in samples:
            out[int(s.pid)] = max(out.get(int(s.pid), 0), int(s.smUtil))
            self._last_ts[uuid] = max(self._last_ts.get(uuid, 0), int(s.timeStamp))
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


class _NoSuchError(Exception):
    """Stands in for NVMLLibraryMismatchError on a module without it (never raised)."""


def _is_mps_server(pid: int) -> bool:
    try:
        with open(os.path.join(paths.root("PROCFS_ROOT"), str(pid), "comm")) as f:
            return f.read().strip().startswith(MPS_SERVER_COMM)
    except OSError:
        return False


def _optional(nv, fn, h):
    try:
        return fn(h)
    except nv.NVMLError_NotSupported:
        return None


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
