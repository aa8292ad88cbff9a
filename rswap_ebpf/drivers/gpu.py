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
from collections.abc import Mapping
from dataclasses import dataclass

from ..enforce.cgroup import TaskCgroup, Write
from ..resources import ResourceType
from ..sense.nvml import GpuSample, NvmlCollector
from .base import DriverContext, ResourceDriver

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuAdvice:
    """What the scheduler integration should do: ``task`` should hold ``bytes`` on ``device``."""

    task: str
    device: int | None
    old_bytes: int
    new_bytes: int
    fits: bool


class GpuDriver(ResourceDriver):
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

    def admit(self, task: str, forecast_bytes: int) -> int | None:
        """The device ``task`` may start on (most headroom first), or None if none fits."""
        if self.last is None:
            self.open()
        best = None
        for d in self.last.devices:
            room = self.headroom(d.index, exclude=task)
            if room >= forecast_bytes and (best is None or room > best[1]):
                best = (d.index, room)
        if best is None:
            return None
        self.placement[task] = best[0]
        self.reserved[task] = int(forecast_bytes)
        return best[0]

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
