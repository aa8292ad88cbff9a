"""GPU memory: sensed per process through NVML; allocated by admission, capped where a cap exists.

NVML cannot limit a process's GPU memory, so rswap does not pretend to: an allocation is a
*reservation* on one device, granted by :meth:`GpuDriver.admit` only when the task's forecast fits
what that device has free (after other reservations), and a task is started or placed on the
device admit() names, by UUID (``CUDA_VISIBLE_DEVICES=GPU-…`` or ``MIG-…``).  Two places do give
a real cap, and rswap uses them:

- a MIG instance: its memory is a hard partition, so a task placed on one cannot take more.
  Admission uses the instance's own memory, never the parent GPU's, and prefers the smallest
  instance that fits (the tightest cap);
- MPS: a client started with ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=<MiB>M`` cannot allocate more
  on device 0 of what it sees (the one device CUDA_VISIBLE_DEVICES names).  Set for tasks placed
  on a device where MPS is seen (clients or the server listed) or when ``[resources.gpu_memory]
  mps = true``; fixed for the life of the client.

A change the swap manager decides (one task's units moved to another) is recorded as
:class:`GpuAdvice` for the scheduler integration to act on (migrate, checkpoint, restart with a
smaller batch); ``apply`` writes nothing (neither cap can be changed under a running process).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

from rswap_ebpf.host.cgroup import TaskCgroup, Write
from rswap_ebpf.model.resources import ResourceType
from rswap_ebpf.model.limits import Limits
from rswap_ebpf.model.stats import quantile
from rswap_ebpf.host.gpu.nvml import GpuSample, NvmlCollector
from rswap_ebpf.host.driver import Admits, DriverContext, ResourceDriver

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuAdvice:
    """What the scheduler integration should do: ``task`` should hold ``bytes`` on ``device``."""

    task: str
    device: str | None
    old_bytes: int
    new_bytes: int
    fits: bool


@dataclass(frozen=True)
class GpuPlacement:
    """Where ``task`` may start: ``device`` has ``room_bytes`` >= ``need_bytes`` free, or (device
    None) no device has room and ``room_bytes`` is the most any device has."""

    task: str
    need_bytes: int
    device: str | None                     # UUID: GPU-… or MIG-…
    room_bytes: int
    predicted_bytes: float | None = None   # the forecast behind ``need_bytes`` (None: limits)
    #: how the reservation is held: "MIG instance" (a hard partition), "MPS pinned memory
    #: limit" (the client's cap), or "admission only" (nothing stops the task taking more)
    enforced_by: str = "admission only"
    cap_bytes: int | None = None           # the cap enforced_by holds it to (None: none)

    @property
    def fits(self) -> bool:
        return self.device is not None

    def env(self) -> dict[str, str]:
        """What the task's processes get: the device by UUID (CUDA's and NVML's indices need not
        agree, and neither is promised to be PCI order), and the MPS cap where one is set."""
        if self.device is None:
            return {}
        env = {"CUDA_VISIBLE_DEVICES": self.device}
        if self.enforced_by == MPS_LIMIT and self.cap_bytes is not None:
            # device 0: the only one the client sees; MiB rounded up, as the variable takes it
            env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = f"0={-(-self.cap_bytes // 2**20)}M"
        return env

    def refusal(self) -> str:
        return (f"gpu_memory: predicted to need {self.need_bytes} bytes, the roomiest GPU has "
                f"{max(0, self.room_bytes)} free")


def gpu_need(profiler, task: str, limits: Limits | None, window: int,
             headroom: float) -> tuple[int, float | None] | None:
    """Bytes ``task`` should find free on one GPU before it starts, and the forecast behind it.

    Like the scheduler's admission: the stored profile's forecast peak or the 90th percentile of
    its history (whichever is higher) plus headroom, clamped to the limits; a task never seen on a
    GPU needs its ``max`` (else its ``min``).  None: the task asks for no GPU (no gpu_memory limit
    and no GPU memory in its history), so it is not placed at all.
    """
    r = ResourceType.GPU_MEMORY
    profiler.restore(task)
    prof = profiler.profiles.get((task, r))
    lim = limits if limits is not None else Limits()
    if prof is not None and any(prof.history):
        peak = profiler.get_predicted_needs(task, window)[r].peak
        predicted = max(peak, quantile(prof.history, 0.9, "lower"))
        return lim.clamp(math.ceil(predicted * (1 + headroom))), round(predicted, 1)
    if limits is None:
        return None
    return lim.clamp(lim.max_units if lim.max_units is not None else lim.min_units), None


MIG_INSTANCE, MPS_LIMIT, ADMISSION_ONLY = "MIG instance", "MPS pinned memory limit", "admission only"


class GpuDriver(ResourceDriver, Admits):
    resource = ResourceType.GPU_MEMORY

    def __init__(self, collector: NvmlCollector, mps: bool = False):
        """``mps``: an MPS control daemon serves every GPU (set the per-client cap even before
        the first client makes MPS visible through NVML)."""
        self.collector = collector
        self.mps = mps
        self.placement: dict[str, str] = {}      # task -> device UUID
        self.reserved: dict[str, int] = {}       # task -> bytes reserved
        self.advice: list[GpuAdvice] = []
        self.usage: dict[str, int] = {}          # task -> bytes its processes hold now
        self.last: GpuSample | None = None
        self._opened = False

    def open(self) -> None:
        if not self._opened:
            self.collector.open()
            self._opened = True
            self.last = self.collector.drain()

    def total(self) -> int:
        """Memory a task can be placed in: GPUs without MIG and MIG instances (a MIG parent's
        memory is its instances')."""
        self.open()
        return sum(d.total_bytes for d in self.last.devices if d.placeable)

    def measure(self, tasks: Mapping[str, TaskCgroup]) -> dict[str, float]:
        """Bytes each task's processes hold; {} (missing, not zeros) when NVML cannot list
        processes on this driver."""
        self.last = self.collector.drain()
        if self.last.processes_missing is not None:
            self.usage = {}
            return {}
        self.usage = {name: self.last.used_by(set(cg.pids())) for name, cg in tasks.items()}
        return {name: float(b) for name, b in self.usage.items()}

    # -- admission ---------------------------------------------------------------------------
    def headroom(self, device: str | int, exclude: str | None = None) -> int:
        """Bytes free on ``device`` minus what admitted tasks reserved but do not use yet."""
        if self.last is None:
            self.open()
        dev = self.last.device(device)
        if isinstance(device, int):
            device = dev.uuid
        pending = sum(max(0, self.reserved.get(t, 0) - self.usage.get(t, 0))
                      for t, d in self.placement.items() if d == device and t != exclude)
        return dev.free_bytes - pending

    def fit(self, task: str, need_bytes: int, predicted: float | None = None) -> GpuPlacement:
        """Where ``task`` fits, on fresh NVML figures; records nothing.

        The smallest MIG instance that fits (its memory is the task's cap), else the GPU with
        the most headroom.  A MIG parent is never a candidate: its memory is its instances'.
        """
        self.open()
        self.last = self.collector.drain()
        rooms = [(d, self.headroom(d.uuid, exclude=task)) for d in self.last.devices if d.placeable]
        if not rooms:  # every device fell off the bus since open()
            return GpuPlacement(task, int(need_bytes), None, 0, predicted)
        mig = [(d, r) for d, r in rooms if d.mig_parent is not None and r >= need_bytes]
        if mig:
            d, room = min(mig, key=lambda dr: (dr[0].total_bytes, -dr[1]))
            return GpuPlacement(task, int(need_bytes), d.uuid, room, predicted, MIG_INSTANCE,
                                d.total_bytes)
        d, room = max(rooms, key=lambda dr: dr[1])
        if room < need_bytes:
            return GpuPlacement(task, int(need_bytes), None, room, predicted)
        if d.mps or self.mps:
            return GpuPlacement(task, int(need_bytes), d.uuid, room, predicted, MPS_LIMIT,
                                int(need_bytes))
        return GpuPlacement(task, int(need_bytes), d.uuid, room, predicted)

    def place(self, task: str, need_bytes: int, predicted: float | None = None) -> GpuPlacement:
        """:meth:`fit`, and when it fits, reserve ``need_bytes`` on that device for ``task``."""
        p = self.fit(task, need_bytes, predicted)
        if p.fits:
            self.placement[task] = p.device
            self.reserved[task] = p.need_bytes
        return p

    def admit(self, task: str, forecast_bytes: int) -> str | None:
        """The device ``task`` may start on (most headroom first), or None if none fits."""
        return self.place(task, forecast_bytes).device

    def release(self, task: str) -> None:
        self.placement.pop(task, None)
        self.reserved.pop(task, None)

    # -- the driver interface ----------------------------------------------------------------
    def plan(self, cg: TaskCgroup, units: int) -> list[Write]:
        return []

    def apply(self, cg: TaskCgroup, units: int) -> list[Write]:
        """Record advice; NVML has no memory cap to write."""
        old = self.reserved.get(cg.name, 0)
        dev = self.placement.get(cg.name)
        fits = dev is not None and units - max(old, self.usage.get(cg.name, 0)) <= \
            self.headroom(dev, exclude=cg.name)
        self.advice.append(GpuAdvice(cg.name, dev, old, int(units), fits))
        if dev is not None:
            self.reserved[cg.name] = int(units)
        return []

    def close(self) -> None:
        if self._opened:
            self.collector.close()
            self._opened = False


def make(ctx: DriverContext) -> GpuDriver:
    opts = dict(getattr(ctx.config, "options", {}).get(ResourceType.GPU_MEMORY, {}))
    drv = GpuDriver(NvmlCollector(devices=opts.get("devices")), mps=bool(opts.get("mps", False)))
    drv.open()  # raises FeatureMissing now, at build time, on a host without the driver
    return drv
