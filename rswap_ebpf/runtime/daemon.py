"""The tick loop: sense -> predict -> swap -> enforce, once per interval.

Start-up order matters for a host that must be restorable: take the lock, restore anything a
crashed run left (journal), then create cgroups, start commands and load BPF.  Shutdown (SIGINT,
SIGTERM, ``--count`` reached, or an exception) stops what rswap started and replays the journal, so
the host is as it was.
"""
from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from rswap_ebpf import paths
from rswap_ebpf.runtime.config import Config
from rswap_ebpf.host import registry as drivermod
from rswap_ebpf.host.registry import DriverContext, ResourceDriver
from rswap_ebpf.host.cgroup import CgroupManager, FileApplier, TaskCgroup, detect_mounts
from rswap_ebpf.host.journal import Journal
from rswap_ebpf.errors import AlreadyRunning, FeatureMissing, RswapError
from rswap_ebpf.runtime.fairlock import FairRLock
from rswap_ebpf.predict.registry import make_forecaster
from rswap_ebpf.predict.profile import Prediction, TaskProfiler
from rswap_ebpf.model.resources import Resource, ResourcePool, ResourceType
from rswap_ebpf.host import bpf as bpfmod
from rswap_ebpf.swap.manager import AllocationResult, ManagedTask, SwapManager
from rswap_ebpf.swap.policy import StabilityPolicy
from rswap_ebpf.errors import EnforceError

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
LOCK_FILE = "rswap.lock"
JOURNAL_FILE = "journal.jsonl"


def journal_path(state_dir: str) -> str:
    return os.path.join(state_dir, JOURNAL_FILE)


def status_path() -> str:
    return os.path.join(paths.root("RUN_DIR"), STATUS_FILE)


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
    env: dict[str, str] = field(default_factory=dict)  # given to its processes (CUDA_VISIBLE_DEVICES)


@dataclass(frozen=True)
class TickReport:
    tick: int
    duration_s: float
    result: AllocationResult
    usage: dict[str, dict[Resource, float]]
    forecasts: dict[str, dict[Resource, float]]


_SUFFIX = {"millicores": "m", "iops": "/s", "ways": "w", "percent": "%"}


def fmt_units(value: float, r: Resource) -> str:
    """A figure in its resource's unit, short enough for the live table (1500m, 1.2MB/s)."""
    if r.unit in ("bytes", "bytes_per_s"):
        tail = "B/s" if r.unit == "bytes_per_s" else "B"
        for prefix in ("", "K", "M", "G", "T"):
            if abs(value) < 1000 or prefix == "T":
                return f"{value:.0f}{prefix}{tail}" if not prefix else f"{value:.1f}{prefix}{tail}"
            value /= 1000
    return f"{value:.0f}{_SUFFIX.get(r.unit, '')}"


class Lock:
    """An flock on ``RUN_DIR/rswap.lock``: released by the kernel when the holder dies."""

    def __init__(self) -> None:
        self.path = os.path.join(paths.root("RUN_DIR"), LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o755, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with open(self.path) as f:
                holder = f.read().strip() or "?"
            os.close(fd)
            raise AlreadyRunning(f"another rswap (pid {holder}) is running; stop it first "
                                 "(or use rswap status)") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    @property
    def acquired(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    @staticmethod
    def held() -> bool:
        path = os.path.join(paths.root("RUN_DIR"), LOCK_FILE)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)


def restore_host(state_dir: str) -> tuple[int, list[str], int]:
    """Undo a journal left in ``state_dir`` and remove stale pins: (restored, failures, pins)."""
    journal = Journal(journal_path(state_dir))
    report = journal.restore()
    pins = bpfmod.remove_all_pins()
    return report.restored, report.failed, pins


class Daemon:
    def __init__(self, config: Config, dry_run: bool = False,
                 drivers: list[ResourceDriver] | None = None,
                 out: IO[str] | None = None, mounts=None):
        self.config = config
        self.dry_run = dry_run
        self.out = out if out is not None else sys.stdout
        self.state_dir = config.daemon.state_path
        self.lock = Lock()
        self.journal = Journal(journal_path(self.state_dir))
        self._mounts = mounts
        self._drivers_given = drivers
        self.drivers: dict[Resource, ResourceDriver] = {}
        #: resources the configuration names but this host lacks (drivers.MAY_BE_ABSENT): why
        self.missing: dict[Resource, str] = {}
        #: resource key -> overflow counter -> events its collector dropped (a BPF map was full)
        self.bpf_overflow: dict[str, dict[str, int]] = {}
        self.pool = ResourcePool()
        self.profiler = TaskProfiler(self._forecaster_for, history=config.daemon.history)
        self.manager = SwapManager(self.pool, headroom=config.daemon.headroom)
        dc = config.daemon
        self.manager.policy = StabilityPolicy(dc.hold_ticks, dc.deadband, dc.max_step_down)
        #: held by each tick and by every control-socket request (they run between ticks)
        # Fair: a control request waiting during a tick gets it next, even when ticks overrun.
        self.mutex = FairRLock()
        self.runtime_forecasters: dict[str, Any] = {}
        self.applier: FileApplier | None = None
        self.control = None    # control.ControlServer while run() serves the socket
        self.scheduler = None  # sched.Scheduler
        self.overflow = None   # overflow.OverflowHook when configured
        self.tasks: dict[str, TaskRuntime] = {}
        #: configured tasks waiting for GPU admission: name -> (TaskConfig, cgroup, why)
        self.pending: dict[str, tuple[Any, TaskCgroup, str]] = {}
        self.tick_no = 0
        #: (task, resource) -> a critical task's seasonal floor this tick (_forecast), for drivers
        #: that keep it as a floor under the task's limit (CpuDriver.set_floor) instead of units
        self._floors: dict[tuple[str, Resource], float] = {}
        #: resource -> cores a driver's settle() keeps for the critical tier now (said on change)
        self._isolated: dict[Resource, int] = {}
        self._stop = False
        self._started = False
        self.last_report: TickReport | None = None
        self.on_tick: Callable[[TickReport], None] | None = None

    # -- life cycle ----------------------------------------------------------------------
    def _forecaster_for(self, task: str, r: Resource):
        spec = next((t.forecaster for t in self.config.tasks if t.name == task), None)
        if spec is None:
            spec = self.runtime_forecasters.get(task)
        total = self.pool.total(r) if r in self.pool else 1
        return make_forecaster(spec, scale=max(1, total))

    def _open_profiles(self) -> None:
        """Persistent profiles (state_dir/profiles.db): tasks start with what earlier runs learnt."""
        from rswap_ebpf.predict.store import ProfileStore, Retention

        d = self.config.daemon
        try:
            self.profiler.store = ProfileStore.in_dir(self.state_dir,
                                                      Retention(d.retention_days, d.rollup_s))
            self.profiler.checkpoint_every = d.checkpoint_every
            self.profiler.interval = d.interval
        except RswapError as err:
            log.warning("profiles will not persist: %s", err)
            self.profiler.store = None

    def _close_profiles(self) -> None:
        store = self.profiler.store
        if store is None:
            return
        try:
            self.profiler.checkpoint(time.time())
        except RswapError as err:
            log.warning("final profile checkpoint failed: %s", err)
        self.profiler.store = None
        store.close()

    def start(self) -> None:
        self.lock.acquire()
        try:
            if self.journal:
                n = len(self.journal.entries())
                self._say(f"rswap: a previous run left {n} journalled change(s); restoring them first")
                report = self.journal.restore()
                if report.failed:
                    raise RswapError("could not restore the previous run's changes: "
                                     + "; ".join(report.failed) + " (fix, then rswap restore)")
                self.journal = Journal(journal_path(self.state_dir))
            mounts = self._mounts or detect_mounts()
            self.cgroups = CgroupManager(self.journal, mounts)
            applier = FileApplier(self.journal, dry_run=self.dry_run)
            self.applier = applier
            wanted = self.config.resources or {ResourceType.PROCESSOR_CYCLES}
            if self._drivers_given is not None:
                self.drivers = {d.resource: d for d in self._drivers_given}
            else:
                ctx = DriverContext(mounts, self.journal, applier, self.config, self.dry_run)
                for r in sorted(wanted, key=lambda r: r.key):
                    try:
                        self.drivers[r] = drivermod.build(r, ctx)
                    except FeatureMissing as err:
                        if r not in drivermod.MAY_BE_ABSENT:
                            raise
                        # Reported as missing (status, doctor), never as zero usage.
                        self.missing[r] = str(err)
                        self._say(f"rswap: {r.key} is missing, the other resources go on: {err}")
            for r, d in self.drivers.items():
                total = self.config.totals.get(r) or d.total()
                self.pool.register_resource(r, total)
                self.pool.monitor_resource(r, d.total if not self.config.totals.get(r) else None)
            # Resolve every task before changing anything, so bad input applies nothing.
            resolved = []
            for t in self.config.tasks:
                cg = self.cgroups.resolve(t.name, t.cgroup)
                if t.cgroup is not None:
                    self.cgroups.check_exists(cg)
                resolved.append((t, cg))
            self._started = True
            self._open_profiles()
            for t, cg in resolved:
                gp = self.gpu_placement(t.name, t.limits.get(ResourceType.GPU_MEMORY), place=True)
                if gp is not None and not gp.fits and t.command:
                    # Not started until its forecast fits a GPU: retried every tick.
                    self.pending[t.name] = (t, cg, gp.refusal())
                    self._say(f"rswap: task {t.name} waits for a GPU: {gp.refusal()}")
                    continue
                self._start_configured(t, cg, gp)
            for d in self.drivers.values():
                d.open()
        except BaseException:
            self.stop()
            raise

    def _start_configured(self, t, cg: TaskCgroup, gp=None) -> TaskRuntime:
        self.manager.add_task(ManagedTask(t.name, t.priority, t.limits))
        self._shape(t.name, t.priority.name.lower())
        if cg.owned:
            self.cgroups.create(cg)
        else:
            self.cgroups.adopt(cg)
        rt = TaskRuntime(t.name, t.priority.name.lower(), cg)
        if gp is not None and gp.fits:
            rt.gpu_device, rt.env = gp.device, gp.env()
        elif gp is not None:  # already running (cgroup/pids): placed nowhere, said out loud
            self._say(f"rswap: task {t.name} runs without a GPU reservation: {gp.refusal()}")
        for pid in t.pids:
            self.cgroups.move(cg, pid)
        if t.command:
            rt.process = self._spawn(t.command, cg, rt.env)
        self.tasks[t.name] = rt
        self.profiler.restore(t.name)
        return rt

    def gpu_placement(self, name: str, limits=None, place: bool = False):
        """GPU admission for ``name`` (a drivers.gpu.GpuPlacement), or None when no GPU is
        managed or the task asks for none.  ``place`` reserves the device when it fits."""
        drv = self.drivers.get(ResourceType.GPU_MEMORY)
        if drv is None or not hasattr(drv, "place"):
            return None
        from rswap_ebpf.host.gpu.driver import gpu_need

        need = gpu_need(self.profiler, name, limits, self.config.daemon.window,
                        self.config.daemon.headroom)
        if need is None:
            return None
        return (drv.place if place else drv.fit)(name, need[0], need[1])

    def _start_pending(self) -> None:
        """Start configured tasks that waited for a GPU, in configuration order, once they fit."""
        for name, (t, cg, why) in list(self.pending.items()):
            gp = self.gpu_placement(name, t.limits.get(ResourceType.GPU_MEMORY), place=True)
            if gp is None or gp.fits:
                del self.pending[name]
                self._start_configured(t, cg, gp)
                self._say(f"rswap: task {name} started on GPU {gp.device if gp else '-'}")
            else:
                self.pending[name] = (t, cg, gp.refusal())
                self._report_gpu_shortfall(name, t.priority, gp)

    def _report_gpu_shortfall(self, name: str, priority, gp) -> None:
        if self.overflow is not None:
            from rswap_ebpf.swap.manager import Shortfall

            self.overflow.submit("admission", [Shortfall(name, ResourceType.GPU_MEMORY,
                                                         gp.need_bytes, max(0, gp.room_bytes))],
                                 {name: priority.name.lower()})

    def _release_gpu(self, name: str) -> None:
        drv = self.drivers.get(ResourceType.GPU_MEMORY)
        if drv is not None and hasattr(drv, "release"):
            drv.release(name)

    def _shape(self, name: str, priority: str) -> None:
        """Tell drivers that shape a task by tier (CPU: burst, weight, idle) which tier it is."""
        for d in self.drivers.values():
            hook = getattr(d, "set_priority", None)
            if hook is not None:
                hook(name, priority)

    def _spawn(self, command: tuple[str, ...], cg: TaskCgroup,
               env: dict[str, str] | None = None) -> subprocess.Popen:
        procs = [os.path.join(d, "cgroup.procs") for d in cg.dirs.values()]

        def enter_cgroup() -> None:  # runs in the child, before exec: no instant outside
            me = str(os.getpid())
            for p in procs:
                with open(p, "w") as f:
                    f.write(me)
            os.setsid()

        try:
            return subprocess.Popen(list(command), preexec_fn=enter_cgroup,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, close_fds=True,
                                    env={**os.environ, **env} if env else None)
        except (OSError, subprocess.SubprocessError) as err:
            raise RswapError(f"task {cg.name}: cannot start {command[0]!r}: {err}") from err

    def stop(self) -> None:
        """Stop what rswap started and put the host back; safe to call more than once."""
        if not self.lock.acquired:
            # Never started (another daemon holds the lock) or already stopped: the journal,
            # status file and pins belong to someone else now; touch nothing.
            return
        for rt in self.tasks.values():
            if rt.process is not None and rt.process.poll() is None:
                self.cgroups.kill(rt.cgroup, signal.SIGTERM)
        deadline = time.monotonic() + 3
        for rt in self.tasks.values():
            if rt.process is not None:
                try:
                    rt.process.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
                if rt.cgroup.owned:
                    self.cgroups.kill(rt.cgroup, signal.SIGKILL)
                    try:
                        rt.process.wait(timeout=2)
                    except subprocess.TimeoutExpired:
                        pass
        for d in self.drivers.values():
            try:
                d.close()
            except Exception as err:
                log.warning("closing %s driver: %s", d.resource.key, err)
        report = self.journal.restore()
        if report.failed:
            self._say("rswap: could not restore: " + "; ".join(report.failed)
                      + " (run rswap restore once fixed)")
        try:
            os.unlink(status_path())
        except FileNotFoundError:
            pass
        self._close_profiles()
        self.lock.release()
        self.tasks.clear()
        self.pending.clear()
        self.drivers.clear()

    # -- the loop -------------------------------------------------------------------------
    def tick(self) -> TickReport:
        t0 = time.perf_counter()
        self.tick_no += 1
        self._reap_vanished()
        if self.pending:
            self._start_pending()
        cgroups = {n: rt.cgroup for n, rt in self.tasks.items() if rt.exited is None}
        usage: dict[str, dict[Resource, float]] = {n: {} for n in cgroups}
        observed: dict[str, dict[Resource, float]] = {n: {} for n in cgroups}
        for r, d in self.drivers.items():
            self.pool.monitor_resource(r)
            measured = d.measure(cgroups)
            self._note_overflow(r, getattr(d, "last_dropped", None))
            capped = d.censored(cgroups)
            held_back = d.withheld(cgroups)
            for name, units in measured.items():
                usage[name][r] = units
                observed[name][r] = self.manager.observed_demand(name, r, units, capped.get(name),
                                                                 held_back.get(name))
        self._reap()
        forecasts: dict[str, dict[Resource, float]] = {}
        releases: dict[str, dict[Resource, float]] = {}
        for name, per_r in observed.items():
            if self.tasks[name].exited is not None:
                continue
            for r, units in per_r.items():
                self.profiler.update_prediction(name, r, units)
            self.tasks[name].usage = usage[name]
            forecasts[name] = self._forecast(name)
            releases[name] = self.profiler.releases(name)
        try:
            self.profiler.flush(time.time())
        except RswapError as err:  # a full disk must not stop allocation
            log.warning("%s", err)
        result = self.manager.proactive_allocation(forecasts, observed, releases)
        floored = self._set_floors()
        for ch in result.changes:
            floored.discard((ch.task, ch.resource))
        todo = [(ch.task, ch.resource, ch.new) for ch in result.changes]
        todo += [(n, r, self.pool.allocation(r, n)) for n, r in sorted(floored, key=str)]
        for task, res, units in todo:
            rt = self.tasks.get(task)
            driver = self.drivers.get(res)
            if rt is None or driver is None or rt.exited is not None:
                continue
            try:
                driver.apply(rt.cgroup, units)
            except EnforceError as err:  # its cgroup vanished mid-tick: reaped next tick
                if rt.cgroup.exists():
                    raise
                log.info("task %s: cgroup gone while applying (%s)", task, err)
        self._settle_drivers()
        report = TickReport(self.tick_no, time.perf_counter() - t0, result, usage, forecasts)
        self.last_report = report
        self._publish()
        if self.on_tick:
            self.on_tick(report)
        return report

    def _settle_drivers(self) -> None:
        """Drivers that act on a whole tier after the tick's units are written (CpuDriver.settle:
        lower tiers' cpusets leave a critical burst its cores) see every live task's units."""
        live = {n: rt.cgroup for n, rt in self.tasks.items()
                if rt.exited is None and n in self.manager.tasks}
        for r, drv in self.drivers.items():
            settle = getattr(drv, "settle", None)
            if settle is not None:
                state = settle(live, {n: self.pool.allocation(r, n) for n in live})
                cores = getattr(state, "cores", None)
                if cores is not None and cores != self._isolated.get(r, 0):
                    self._say(f"rswap: {r.key} isolation: {cores} core(s) kept for the critical "
                              f"tier (lower tiers on {sorted(state.lower_cpus)})")
                    self._isolated[r] = cores

    def _set_floors(self) -> set[tuple[str, Resource]]:
        """Hand this tick's critical floors (plus headroom, within the task's limits) to the
        drivers that keep them (CpuDriver.set_floor); the (task, resource) pairs that changed."""
        changed = set()
        live = {n for n, rt in self.tasks.items() if rt.exited is None and n in self.manager.tasks}
        for r, drv in self.drivers.items():
            keep = getattr(drv, "set_floor", None)
            if keep is None:
                continue
            for name in [n for n in getattr(drv, "floors", {}) if (n, r) not in self._floors
                         or n not in live]:
                keep(name, 0)  # gone, or no longer floored: its limit follows its units again
            for (name, fr), floor in self._floors.items():
                if fr != r or name not in live:
                    continue
                lim = self.manager.tasks[name].limit(r)
                units = lim.clamp(math.ceil(max(0.0, floor) * (1 + self.manager.headroom)))
                if keep(name, units):
                    changed.add((name, r))
        self._floors = {k: v for k, v in self._floors.items() if k[0] in live}
        return changed

    def _forecast(self, name: str) -> dict[Resource, float]:
        """Each resource's need over the window; a critical task's is at least its floor.

        Between bursts a critical task's forecast falls to its idle level, and the tick that
        raises it can land after the burst began: the first requests are throttled.  So a
        critical task keeps the ``critical_floor`` quantile of its forecast over a whole season
        (the forecaster's period, or ``critical_season`` ticks): a service busy a quarter of the
        time keeps about its burst level, one that bursts rarely keeps little more than idle.
        """
        dc = self.config.daemon
        rt = self.tasks[name]
        if rt.priority != "critical" or not dc.critical_floor:
            preds = self.profiler.get_predicted_needs(name, dc.window)
            return {r: p.peak for r, p in preds.items()}
        out = {}
        for r in self.pool.types():
            prof = self.profiler.profiles.get((name, r))
            if prof is None:
                continue
            season = dc.critical_season or getattr(prof.forecaster, "period", 0) or dc.window
            series = prof.forecast(max(dc.window, int(season)))
            floor = Prediction(name, r, tuple(series), 0.0, "", None, 0).over_window(dc.critical_floor)
            if hasattr(self.drivers.get(r), "set_floor"):
                # CPU: the floor is kept under the task's quota and weight, not as units held
                out[r] = max(series[:dc.window])
                self._floors[(name, r)] = floor if math.isfinite(floor) else 0.0
            else:
                out[r] = max(max(series[:dc.window]), floor)
        return out

    def _note_overflow(self, r: Resource, dropped: dict[str, int] | None) -> None:
        """BPF maps are bounded: say when a full map made a collector drop events (the counters
        in its stats map only grow), and keep the totals for ``status``."""
        if not dropped:
            return
        seen = self.bpf_overflow.setdefault(r.key, {})
        for label, n in dropped.items():
            if n > seen.get(label, 0):
                self._say(f"rswap: {r.key} BPF {label}: {n - seen.get(label, 0)} event(s) not "
                          f"counted this tick ({n} in all); usage reads low until the map drains")
                seen[label] = n

    def _reap(self) -> None:
        for name, rt in self.tasks.items():
            if rt.process is None or rt.exited is not None:
                continue
            code = rt.process.poll()
            if code is not None and not rt.cgroup.pids():
                rt.exited = code
                self.manager.remove_task(name)
                self._release_gpu(name)
                self.profiler.forget(name)
                self._say(f"rswap: task {name} exited with status {code}; its units are released")

    def run(self, count: int | None = None) -> int:
        interval = self.config.daemon.interval
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def on_signal(signum, frame):
            self._stop = True

        for s in old:
            signal.signal(s, on_signal)
        try:
            self.start()
            self._publish()  # rswap status answers from the start, before the first tick
            self._serve_control()
            self._print_header()
            next_at = time.monotonic() + interval
            while not self._stop and (count is None or self.tick_no < count):
                delay = next_at - time.monotonic()
                while delay > 0 and not self._stop:
                    time.sleep(min(delay, 0.2))
                    delay = next_at - time.monotonic()
                if self._stop:
                    break
                next_at += interval
                if next_at < time.monotonic():  # we fell behind: do not try to catch up
                    next_at = time.monotonic() + interval
                with self.mutex:
                    report = self.tick()
                    self._print_tick(report)
                    if self.scheduler is not None:
                        self.scheduler.serve_queue()
        finally:
            self._close_control()
            self.stop()
            for s, h in old.items():
                signal.signal(s, h)
        self._say("rswap: stopped; host restored")
        return 0

    # -- tasks at run time (control socket, rswap exec) ------------------------------------
    def add_task(self, tc, source: str = "socket", owner_pid: int | None = None,
                 allocate: bool = True) -> TaskRuntime:
        """Start managing ``tc`` (a config.TaskConfig) now; bad input applies nothing."""
        with self.mutex:
            old = self.tasks.get(tc.name)
            if old is not None and old.exited is None:
                raise RswapError(f"a task named {tc.name!r} is already running")
            cg = self.cgroups.resolve(tc.name, tc.cgroup)
            if tc.cgroup is not None:
                self.cgroups.check_exists(cg)
            self.manager.add_task(ManagedTask(tc.name, tc.priority, tc.limits))
            self._shape(tc.name, tc.priority.name.lower())
            self.tasks.pop(tc.name, None)
            if tc.forecaster is not None:
                self.runtime_forecasters[tc.name] = tc.forecaster
            rt = TaskRuntime(tc.name, tc.priority.name.lower(), cg, source=source,
                             owner_pid=owner_pid)
            gp = self.gpu_placement(tc.name, tc.limits.get(ResourceType.GPU_MEMORY), place=True)
            if gp is not None and not gp.fits:
                self.manager.remove_task(tc.name)
                self._report_gpu_shortfall(tc.name, tc.priority, gp)
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
                    rt.process = self._spawn(tc.command, cg, rt.env)
            except BaseException:
                self.manager.remove_task(tc.name)
                self._release_gpu(tc.name)
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
            self._say(f"rswap: task {tc.name} ({rt.priority}) added ({source})")
            return rt

    def apply_allocation(self, name: str, r: Resource) -> None:
        rt, driver = self.tasks.get(name), self.drivers.get(r)
        if rt is not None and driver is not None and rt.exited is None:
            driver.apply(rt.cgroup, self.pool.allocation(r, name))

    def remove_task(self, name: str, why: str = "removed") -> dict[Resource, int]:
        """Stop managing ``name``: release its units, undo its limits, drop its cgroup."""
        with self.mutex:
            rt = self.tasks.pop(name, None)
            if rt is None:
                raise RswapError(f"no task named {name!r}")
            released = {r: self.pool.allocation(r, name) for r in self.pool.types()}
            if name in self.manager.tasks:
                self.manager.remove_task(name)
            self._release_gpu(name)
            self.profiler.forget(name)  # checkpointed: NAME's next start is predicted from it
            self.runtime_forecasters.pop(name, None)
            if rt.process is not None and rt.process.poll() is None:
                self.cgroups.kill(rt.cgroup, signal.SIGTERM)
                try:
                    rt.process.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    self.cgroups.kill(rt.cgroup, signal.SIGKILL)
                    rt.process.wait(timeout=2)
            self._undo_task_files(rt.cgroup)
            self.cgroups.remove(rt.cgroup)
            self._say(f"rswap: task {name} {why}; its units are released")
            return {r: u for r, u in released.items() if u}

    def _undo_task_files(self, cg: TaskCgroup) -> None:
        """Put back what rswap wrote in the task's directories, and send moved pids home."""
        from rswap_ebpf.host.journal import write_file

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
            for path in [p for p in self.applier._last if p.startswith(prefixes)]:
                del self.applier._last[path]
            self.applier.overridden = {p for p in self.applier.overridden
                                       if not p.startswith(prefixes)}

    def _reap_vanished(self) -> None:
        """Tasks whose cgroup was removed, or whose processes are all gone, are let go."""
        for name, rt in list(self.tasks.items()):
            if rt.exited is not None:
                continue
            if not rt.cgroup.exists():
                self.remove_task(name, "vanished (its cgroup was removed)")
                continue
            if rt.process is not None or not rt.cgroup.owned:
                continue
            if rt.cgroup.pids():
                rt.had_pids = True
            elif rt.had_pids:
                self.remove_task(name, "exited (no process left in its cgroup)")
            elif rt.owner_pid is not None and not _alive(rt.owner_pid):
                self.remove_task(name, f"abandoned (rswap exec pid {rt.owner_pid} is gone)")

    def _serve_control(self) -> None:
        from rswap_ebpf.server.control import ControlServer
        from rswap_ebpf.server.scheduler import Scheduler

        dc = self.config.daemon
        if dc.overflow_command or dc.overflow_url:
            from rswap_ebpf.runtime.overflow import OverflowHook

            self.overflow = OverflowHook(dc.overflow_command, dc.overflow_url,
                                         interval_s=dc.overflow_interval,
                                         priority_of=lambda t: self.tasks[t].priority
                                         if t in self.tasks else None)
            self.manager.overflow_hook = self.overflow
        self.scheduler = Scheduler(self, self.overflow)
        self.control = ControlServer(self.scheduler.dispatch)
        self.control.start()
        self.scheduler.warm_up()  # a first rswap exec / task add need not wait for River's import

    def _close_control(self) -> None:
        if self.scheduler is not None:
            with self.mutex:
                self.scheduler.close()
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.overflow is not None:
            self.overflow.close()
            self.manager.overflow_hook = None
            self.overflow = None

    # -- output ---------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        pool = {}
        for r, snap in self.pool.get_available_resources().items():
            pool[r.key] = {"unit": r.unit, "total": snap.total_units,
                           "available": snap.available_units, "allocations": dict(snap.allocations)}
        tasks = {}
        rep = self.last_report
        for name, rt in self.tasks.items():
            per = {}
            for r in self.pool.types():
                prof = self.profiler.profiles.get((name, r))
                per[r.key] = {
                    "usage": round(rt.usage.get(r, 0.0), 1),
                    "forecast": round(rep.forecasts.get(name, {}).get(r, 0.0), 1) if rep else 0.0,
                    "allocation": self.pool.allocation(r, name),
                    "model": prof.model_name if prof else None,
                    "mae": round(prof.mae, 1) if prof and prof.mae is not None else None,
                }
            tasks[name] = {"priority": rt.priority, "cgroup": rt.cgroup.rel,
                           "pids": len(rt.cgroup.pids()), "exited": rt.exited, "resources": per,
                           "gpu_device": rt.gpu_device}
        return {"pid": os.getpid(), "tick": self.tick_no, "time": time.time(),
                "interval": self.config.daemon.interval, "dry_run": self.dry_run,
                "pool": pool, "tasks": tasks,
                "missing": {r.key: why for r, why in self.missing.items()},
                "pending": {n: why for n, (_, _, why) in self.pending.items()},
                "bpf_overflow": {k: dict(v) for k, v in self.bpf_overflow.items()},
                "swaps": [{"resource": s.resource.key, "from": s.source, "to": s.target,
                           "units": s.units, "reason": s.reason}
                          for s in (rep.result.swaps if rep else [])],
                "shortfalls": [{"task": s.task, "resource": s.resource.key, "wanted": s.wanted,
                                "granted": s.granted} for s in (rep.result.shortfalls if rep else [])]}

    def _publish(self) -> None:
        path = status_path()
        tmp = path + ".tmp"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "w") as f:
                json.dump(self.status(), f)
            os.replace(tmp, path)
        except OSError as err:
            log.warning("cannot write %s: %s", path, err.strerror)

    def _say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def _name_width(self) -> int:
        return max([12] + [len(n) for n in self.tasks])

    def _res_width(self) -> int:
        return max([4] + [len(r.key) for r in self.pool.types()])  # coproc:fpga0

    def _print_header(self) -> None:
        totals = ", ".join(f"{r.key} {self.pool.total(r)} {r.unit}" for r in self.pool.types())
        mode = " (dry run: nothing is written)" if self.dry_run else ""
        self._say(f"rswap: {len(self.tasks)} task(s), pool: {totals}, every "
                  f"{self.config.daemon.interval:g}s{mode}; Ctrl-C stops and restores")
        w, rw = self._name_width(), self._res_width()
        self._say(f"{'TICK':>5} {'TASK':<{w}} {'PRIO':<8} {'RES':<{rw}} {'USED':>8} "
                  f"{'FORECAST':>9} {'ALLOC':>8} {'FREE':>6}  EVENTS")

    def _print_tick(self, report: TickReport) -> None:
        events: dict[str, list[str]] = {}
        for ch in report.result.changes:
            events.setdefault(ch.task, []).append(f"{ch.resource.key} {ch.old}->{ch.new} ({ch.reason})")
        for s in report.result.swaps:
            events.setdefault(s.target, []).append(f"took {s.units} from {s.source}")
        for sf in report.result.shortfalls:
            events.setdefault(sf.task, []).append(f"short {sf.missing}")
        w, rw = self._name_width(), self._res_width()
        for name, rt in self.tasks.items():
            if rt.exited is not None:
                continue
            for r in self.pool.types():
                used = report.usage.get(name, {}).get(r, 0.0)
                fc = report.forecasts.get(name, {}).get(r, 0.0)
                self._say(f"{report.tick:>5} {name:<{w}} {rt.priority:<8} {r.key:<{rw}} "
                          f"{fmt_units(used, r):>8} {fmt_units(fc, r):>9} "
                          f"{fmt_units(self.pool.allocation(r, name), r):>8} "
                          f"{fmt_units(self.pool.available(r), r):>6}  "
                          + "; ".join(events.get(name, [])))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
