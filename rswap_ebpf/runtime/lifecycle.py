"""Tasks from start to end: add (config, control socket, ``rswap exec``), spawn or adopt, wait
for a GPU, reap when they exit or vanish, remove.

A task is resolved (its cgroup, its pids) before anything is changed, so bad input applies
nothing.  What rswap started is stopped with it (``daemon.kill_mode = "stop"``): a stop that
fails -- a process that will not die, a cgroup removed under the daemon -- is reported, never
raised, so the daemon goes on with the other tasks.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rswap_ebpf.errors import RswapError
from rswap_ebpf.host import process as procmod
from rswap_ebpf.host.cgroup import CgroupManager, FileApplier, TaskCgroup, check_pid
from rswap_ebpf.host.driver import Admits, Driver, Enforces, ShapesByTier
from rswap_ebpf.host.journal import Journal, write_file
from rswap_ebpf.model.resources import Resource, ResourcePool, ResourceType
from rswap_ebpf.predict.profile import TaskProfiler
from rswap_ebpf.swap.manager import ManagedTask, Shortfall, SwapManager

log = logging.getLogger(__name__)


@dataclass
class TaskRuntime:
    name: str
    priority: str
    cgroup: TaskCgroup
    process: subprocess.Popen | None = None
    usage: dict[Resource, float] = field(default_factory=dict)
    exited: int | None = None
    source: str = "config"          # config | socket (task.add) | exec (rswap exec)
    owner_pid: int | None = None    # the rswap exec that asked for it (SO_PEERCRED)
    had_pids: bool = False
    gpu_device: int | None = None   # where GPU admission placed it (NVML index)
    #: given to its processes (CUDA_VISIBLE_DEVICES)
    env: dict[str, str] = field(default_factory=dict)


class TaskLifecycle:
    """The daemon's tasks; every method runs under the daemon's mutex."""

    def __init__(self, config, drivers: Mapping[Resource, Driver], pool: ResourcePool,
                 manager: SwapManager, profiler: TaskProfiler, say: Callable[[str], None]):
        self.config = config
        self.drivers = drivers
        self.pool = pool
        self.manager = manager
        self.profiler = profiler
        self.say = say
        self.tasks: dict[str, TaskRuntime] = {}
        #: configured tasks waiting for GPU admission: name -> (TaskConfig, cgroup, why)
        self.pending: dict[str, tuple[Any, TaskCgroup, str]] = {}
        self.runtime_forecasters: dict[str, Any] = {}
        self.cgroups: CgroupManager | None = None
        self.applier: FileApplier | None = None
        self.journal: Journal | None = None
        self.spawner: procmod.Spawner | None = None
        #: told of a GPU admission shortfall (the overflow hook), when one is configured
        self.overflow = None

    def bind(self, cgroups: CgroupManager, applier: FileApplier | None, journal: Journal) -> None:
        """The host side, once the lock is held and the journal restored (Daemon.start)."""
        self.cgroups, self.applier, self.journal = cgroups, applier, journal
        self.spawner = procmod.Spawner(journal, keep=self.config.daemon.kill_mode == "keep")

    # -- starting ------------------------------------------------------------------------
    def resolve(self, tc) -> TaskCgroup:
        """``tc``'s cgroup and pids checked, nothing changed yet."""
        cg = self.cgroups.resolve(tc.name, tc.cgroup, tc.priority.name.lower())
        if tc.cgroup is not None:
            self.cgroups.check_exists(cg)
        for pid in tc.pids:
            check_pid(tc.name, pid)
        return cg

    def start_configured(self, resolved) -> None:
        """Start the configuration's tasks (``(TaskConfig, cgroup)`` pairs, resolved); a task
        whose GPU forecast fits no device waits (:meth:`start_pending`, every tick)."""
        for t, cg in resolved:
            gp = self.gpu_placement(t.name, t.limits.get(ResourceType.GPU_MEMORY), place=True)
            if gp is not None and not gp.fits and t.command:
                self.pending[t.name] = (t, cg, gp.refusal())
                self.say(f"rswap: task {t.name} waits for a GPU: {gp.refusal()}")
                continue
            self._start_one(t, cg, gp)

    def _start_one(self, t, cg: TaskCgroup, gp=None) -> TaskRuntime:
        self.manager.add_task(ManagedTask(t.name, t.priority, t.limits))
        self.shape(t.name, t.priority.name.lower(), t.limits)
        if cg.owned:
            self.cgroups.create(cg)
        else:
            self.cgroups.adopt(cg)
        rt = TaskRuntime(t.name, t.priority.name.lower(), cg)
        if gp is not None and gp.fits:
            rt.gpu_device, rt.env = gp.device, gp.env()
        elif gp is not None:  # already running (cgroup/pids): placed nowhere, said out loud
            self.say(f"rswap: task {t.name} runs without a GPU reservation: {gp.refusal()}")
        for pid in t.pids:
            self.cgroups.move(cg, pid)
        if t.command:
            rt.process = self.spawn(t.name, t.command, cg, rt.env)
        self.tasks[t.name] = rt
        self.profiler.restore(t.name)
        return rt

    def start_pending(self) -> None:
        """Start configured tasks that waited for a GPU, in configuration order, once they fit."""
        for name, (t, cg, why) in list(self.pending.items()):
            gp = self.gpu_placement(name, t.limits.get(ResourceType.GPU_MEMORY), place=True)
            if gp is None or gp.fits:
                del self.pending[name]
                self._start_one(t, cg, gp)
                self.say(f"rswap: task {name} started on GPU {gp.device if gp else '-'}")
            else:
                self.pending[name] = (t, cg, gp.refusal())
                self.report_gpu_shortfall(name, t.priority, gp)

    def gpu_placement(self, name: str, limits=None, place: bool = False):
        """GPU admission for ``name`` (a host.gpu.driver.GpuPlacement), or None when no GPU is
        managed or the task asks for none.  ``place`` reserves the device when it fits."""
        drv = self.drivers.get(ResourceType.GPU_MEMORY)
        if not isinstance(drv, Admits):
            return None
        from rswap_ebpf.host.gpu.driver import gpu_need

        need = gpu_need(self.profiler, name, limits, self.config.daemon.window,
                        self.config.daemon.headroom)
        if need is None:
            return None
        return (drv.place if place else drv.fit)(name, need[0], need[1])

    def report_gpu_shortfall(self, name: str, priority, gp) -> None:
        if self.overflow is not None:
            self.overflow.submit("admission", [Shortfall(name, ResourceType.GPU_MEMORY,
                                                         gp.need_bytes, max(0, gp.room_bytes))],
                                 {name: priority.name.lower()})

    def release_gpu(self, name: str) -> None:
        drv = self.drivers.get(ResourceType.GPU_MEMORY)
        if isinstance(drv, Admits):
            drv.release(name)

    def shape(self, name: str, priority: str, limits=None) -> None:
        """Tell drivers that shape a task by tier (CPU: burst, weight, idle) which tier it is,
        and the operator's ceiling of that resource, if the configuration gives one."""
        for r, d in self.drivers.items():
            if isinstance(d, ShapesByTier):
                d.set_priority(name, priority)
                lim = (limits or {}).get(r)
                d.set_limit(name, lim.max_units if lim is not None else None)

    def spawn(self, name: str, command: tuple[str, ...], cg: TaskCgroup,
              env: dict[str, str] | None = None) -> subprocess.Popen:
        procs = [os.path.join(d, "cgroup.procs") for d in cg.dirs.values()]
        return self.spawner.spawn(name, command, procs, env)

    # -- at run time (control socket, rswap exec) ------------------------------------------
    def add(self, tc, source: str = "socket", owner_pid: int | None = None,
            allocate: bool = True) -> TaskRuntime:
        """Start managing ``tc`` (a config.TaskConfig) now; bad input applies nothing."""
        old = self.tasks.get(tc.name)
        if old is not None and old.exited is None:
            raise RswapError(f"a task named {tc.name!r} is already running")
        cg = self.resolve(tc)
        self.manager.add_task(ManagedTask(tc.name, tc.priority, tc.limits))
        self.shape(tc.name, tc.priority.name.lower(), tc.limits)
        self.tasks.pop(tc.name, None)
        if tc.forecaster is not None:
            self.runtime_forecasters[tc.name] = tc.forecaster
        rt = TaskRuntime(tc.name, tc.priority.name.lower(), cg, source=source,
                         owner_pid=owner_pid)
        gp = self.gpu_placement(tc.name, tc.limits.get(ResourceType.GPU_MEMORY), place=True)
        if gp is not None and not gp.fits:
            self.manager.remove_task(tc.name)
            self.report_gpu_shortfall(tc.name, tc.priority, gp)
            raise RswapError(f"task {tc.name} not started, no GPU has room: {gp.refusal()} "
                             "(wait, lower its gpu_memory max, or free a GPU)")
        if gp is not None:
            rt.gpu_device, rt.env = gp.device, gp.env()
        try:
            if cg.owned:
                self.cgroups.create(cg)
            else:
                self.cgroups.adopt(cg)
            for pid in tc.pids:
                self.cgroups.move(cg, pid)
            if tc.command:
                rt.process = self.spawn(tc.name, tc.command, cg, rt.env)
        except BaseException:
            self.manager.remove_task(tc.name)
            self.release_gpu(tc.name)
            self.cgroups.remove(cg)
            raise
        self.tasks[tc.name] = rt
        self.profiler.restore(tc.name)
        if allocate:  # its minimums now; its forecast from the next tick
            for r in self.pool.types():
                lo = tc.limits[r].min_units if r in tc.limits else 0
                if lo:
                    self.pool.set_allocation(r, tc.name, min(lo, self.pool.available(r)))
                    self.apply_allocation(tc.name, r)
        self.say(f"rswap: task {tc.name} ({rt.priority}) added ({source})")
        return rt

    def apply_allocation(self, name: str, r: Resource) -> None:
        rt, driver = self.tasks.get(name), self.drivers.get(r)
        if rt is not None and isinstance(driver, Enforces) and rt.exited is None:
            driver.apply(rt.cgroup, self.pool.allocation(r, name))

    def remove(self, name: str, why: str = "removed") -> dict[Resource, int]:
        """Stop managing ``name``: release its units, undo its limits, drop its cgroup."""
        rt = self.tasks.pop(name, None)
        if rt is None:
            raise RswapError(f"no task named {name!r}")
        released = {r: self.pool.allocation(r, name) for r in self.pool.types()}
        if name in self.manager.tasks:
            self.manager.remove_task(name)
        self.release_gpu(name)
        self.profiler.forget(name)  # checkpointed: NAME's next start is predicted from it
        self.runtime_forecasters.pop(name, None)
        self._stop_process(rt)
        self._undo_task_files(rt.cgroup)
        self.cgroups.remove(rt.cgroup)
        self.say(f"rswap: task {name} {why}; its units are released")
        return {r: u for r, u in released.items() if u}

    def _stop_process(self, rt: TaskRuntime) -> None:
        """SIGTERM what rswap started for ``rt`` (its cgroup and its session), then SIGKILL."""
        if rt.process is None or rt.process.poll() is not None:
            return
        self.cgroups.kill(rt.cgroup, signal.SIGTERM)
        try:
            rt.process.wait(timeout=3)
            return
        except subprocess.TimeoutExpired:
            pass
        self.cgroups.kill(rt.cgroup, signal.SIGKILL)
        if procmod.stop(rt.process, term_s=0.5, kill_s=2) is None:
            self.say(f"rswap: task {rt.name}: pid {rt.process.pid} did not exit; left running")

    def _undo_task_files(self, cg: TaskCgroup) -> None:
        """Put back what rswap wrote in the task's directories, and send moved pids home."""
        prefixes = tuple(d.rstrip("/") + "/" for d in cg.dirs.values())
        pids = {str(p) for p in cg.pids()}
        seen: set[str] = set()
        try:
            entries = self.journal.entries()
        except RswapError:
            entries = []
        for e in entries:
            try:
                if e.get("op") == "write" and e["path"].startswith(prefixes) \
                        and e["path"] not in seen and not cg.owned:
                    seen.add(e["path"])
                    write_file(e["path"], e["original"])
                elif e.get("op") == "move" and str(e.get("pid")) in pids:
                    write_file(e["procs"], str(e["pid"]))
            except OSError:
                pass
        if self.applier is not None:
            self.applier.forget(prefixes)

    # -- ending --------------------------------------------------------------------------
    def reap(self) -> list[str]:
        """Tasks whose command exited and whose cgroup is empty: their units released; names."""
        gone = []
        for name, rt in self.tasks.items():
            if rt.process is None or rt.exited is not None:
                continue
            code = rt.process.poll()
            if code is not None and not rt.cgroup.pids():
                rt.exited = code
                self.manager.remove_task(name)
                self.release_gpu(name)
                self.profiler.forget(name)
                self.say(f"rswap: task {name} exited with status {code}; its units are released")
                gone.append(name)
        return gone

    def reap_vanished(self) -> None:
        """Tasks whose cgroup was removed, or whose processes are all gone, are let go."""
        for name, rt in list(self.tasks.items()):
            if rt.exited is not None:
                continue
            if not rt.cgroup.exists():
                self.remove(name, "vanished (its cgroup was removed)")
                continue
            if rt.process is not None or not rt.cgroup.owned:
                continue
            if rt.cgroup.pids():
                rt.had_pids = True
            elif rt.had_pids:
                self.remove(name, "exited (no process left in its cgroup)")
            elif rt.owner_pid is not None and not _alive(rt.owner_pid):
                self.remove(name, f"abandoned (rswap exec pid {rt.owner_pid} is gone)")

    def stop_all(self) -> None:
        """The daemon stops: what it started goes with it, unless ``kill_mode = "keep"``."""
        if self.config.daemon.kill_mode != "keep":
            started = [rt for rt in self.tasks.values()
                       if rt.process is not None and rt.process.poll() is None]
            for rt in started:
                self.cgroups.kill(rt.cgroup, signal.SIGTERM)
                procmod.signal_session(rt.process.pid, signal.SIGTERM)
            deadline = time.monotonic() + 3
            for rt in started:
                wait_s = max(0.1, deadline - time.monotonic())
                if procmod.stop(rt.process, term_s=wait_s, kill_s=2) is None:
                    self.say(f"rswap: task {rt.name}: pid {rt.process.pid} did not exit")
                if rt.cgroup.owned:
                    self.cgroups.kill(rt.cgroup, signal.SIGKILL)
        if self.spawner is not None:
            self.spawner.close()
        self.tasks.clear()
        self.pending.clear()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
