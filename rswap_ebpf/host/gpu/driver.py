"""GPU memory: sensed per process through NVML; allocated by admission, not by a cap.

NVML cannot limit a process's GPU memory, so rswap does not pretend to: an allocation is a
*reservation* on one device, granted by :meth:`GpuDriver.admit` only when the task's forecast fits
what that device has free (after other reservations), and a task is started or placed on the
device admit() names.  A change the swap manager decides (one task's units moved to another) is
recorded as :class:`GpuAdvice` for the scheduler integration to act on (migrate, checkpoint,
restart with a smaller batch); ``apply`` writes nothing.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

from rswap_ebpf.host.cgroup import TaskCgroup, Write
from rswap_ebpf.model.resources import ResourceType
from rswap_ebpf.model.limits import Limits
from rswap_ebpf.host.gpu.nvml import GpuSample, NvmlCollector
from rswap_ebpf.host.driver import Admits, DriverContext, ResourceDriver

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuAdvice:
    """What the scheduler integration should do: ``task`` should hold ``bytes`` on ``device``."""

    task: str
    device: int | None
    old_bytes: int
    new_bytes: int
    fits: bool


@dataclass(frozen=True)
class GpuPlacement:
    """Where ``task`` may start: ``device`` has ``room_bytes`` >= ``need_bytes`` free, or (device
    None) no device has room and ``room_bytes`` is the most any device has."""

    task: str
    need_bytes: int
    device: int | None
    room_bytes: int
    predicted_bytes: float | None = None   # the forecast behind ``need_bytes`` (None: limits)

    @property
    def fits(self) -> bool:
        return self.device is not None

    def env(self) -> dict[str, str]:
        """What the task's processes get: NVML numbers devices in PCI bus order, CUDA only when
        told to, so both variables are set."""
        if self.device is None:
            return {}
        return {"CUDA_VISIBLE_DEVICES": str(self.device), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}

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
        past = sorted(prof.history)
        predicted = max(peak, past[int(0.9 * (len(past) - 1))])
        return lim.clamp(math.ceil(predicted * (1 + headroom))), round(predicted, 1)
    if limits is None:
        return None
    return lim.clamp(lim.max_units if lim.max_units is not None else lim.min_units), None


class GpuDriver(ResourceDriver, Admits):
    resource = ResourceType.GPU_MEMORY

    def __init__(self, collector: NvmlCollector):
        self.collector = collector
        self.placement: dict[str, int] = {}      # task -> device
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
        self.open()
        return sum(d.total_bytes for d in self.last.devices)

    def measure(self, tasks: Mapping[str, TaskCgroup]) -> dict[str, float]:
        self.last = self.collector.drain()
        self.usage = {name: self.last.used_by(set(cg.pids())) for name, cg in tasks.items()}
        return {name: float(b) for name, b in self.usage.items()}

    # -- admission ---------------------------------------------------------------------------
    def headroom(self, device: int, exclude: str | None = None) -> int:
        """Bytes free on ``device`` minus what admitted tasks reserved but do not use yet."""
        if self.last is None:
            self.open()
        pending = sum(max(0, self.reserved.get(t, 0) - self.usage.get(t, 0))
                      for t, d in self.placement.items() if d == device and t != exclude)
        return self.last.device(device).free_bytes - pending

    def fit(self, task: str, need_bytes: int, predicted: float | None = None) -> GpuPlacement:
        """The device with the most headroom, on fresh NVML figures; records nothing."""
        self.open()
        self.last = self.collector.drain()
        best: tuple[int, int] | None = None
        for d in self.last.devices:
            room = self.headroom(d.index, exclude=task)
            if best is None or room > best[1]:
                best = (d.index, room)
        if best is None:  # every device fell off the bus since open()
            return GpuPlacement(task, int(need_bytes), None, 0, predicted)
        device = best[0] if best[1] >= need_bytes else None
        return GpuPlacement(task, int(need_bytes), device, best[1], predicted)

    def place(self, task: str, need_bytes: int, predicted: float | None = None) -> GpuPlacement:
        """:meth:`fit`, and when it fits, reserve ``need_bytes`` on that device for ``task``."""
        p = self.fit(task, need_bytes, predicted)
        if p.fits:
            self.placement[task] = p.device
            self.reserved[task] = p.need_bytes
        return p

    def admit(self, task: str, forecast_bytes: int) -> int | None:
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
    devices = dict(getattr(ctx.config, "options", {}).get(ResourceType.GPU_MEMORY, {})).get("devices")
    drv = GpuDriver(NvmlCollector(devices=devices))
    drv.open()  # raises FeatureMissing now, at build time, on a host without the driver
    return drv
