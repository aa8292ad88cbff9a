"""The daemon: the lock, the journal, the signals and the drivers around one tick pipeline.

Start-up order matters for a host that must be restorable: take the lock, restore anything a
crashed run left (journal), then create cgroups, start commands and load BPF.  There is one start
path (:meth:`Daemon.start`) and one stop path (:meth:`Daemon.stop`, run once, whatever ends the
run: SIGINT, SIGTERM, SIGHUP, ``--count`` reached, or an exception): it stops what rswap started
and replays the journal, so the host is as it was.

What is composed around the runtime -- the control socket and scheduler (``server/``), the live
table (``cli/``) -- comes in as :class:`Hook` objects: started after the daemon, told each tick,
stopped before it.  The runtime imports neither.
"""
from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import IO, Any

from rswap_ebpf.errors import FeatureMissing, RswapError
from rswap_ebpf.host import registry as drivermod
from rswap_ebpf.host.cgroup import CgroupManager, FileApplier, detect_mounts
from rswap_ebpf.host.driver import Driver
from rswap_ebpf.host.journal import Journal
from rswap_ebpf.model.resources import Resource, ResourcePool, ResourceType
from rswap_ebpf.predict.profile import TaskProfiler
from rswap_ebpf.predict.registry import make_forecaster
from rswap_ebpf.runtime import pipeline as pipelinemod
from rswap_ebpf.runtime import status as statusmod
from rswap_ebpf.runtime.config import Config, check_minimums
from rswap_ebpf.runtime.fairlock import FairRLock
from rswap_ebpf.runtime.gcpolicy import GcPolicy
from rswap_ebpf.runtime.lifecycle import TaskLifecycle, TaskRuntime
from rswap_ebpf.runtime.lock import Lock, journal_path, restore_host
from rswap_ebpf.runtime.pipeline import SlotClock, TickReport
from rswap_ebpf.runtime.status import status_path
from rswap_ebpf.swap.manager import SwapManager
from rswap_ebpf.swap.policy import StabilityPolicy

__all__ = ["Daemon", "Hook", "Lock", "StopSignals", "TaskRuntime", "TickReport", "journal_path",
           "restore_host", "status_path"]

log = logging.getLogger(__name__)


class Hook:
    """Something composed around a running daemon: started after it, told each tick (under the
    daemon's mutex), stopped before it, once."""

    def start(self, daemon: Daemon) -> None:
        pass

    def tick(self, report: TickReport) -> None:
        pass

    def stop(self) -> None:
        pass


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP (a closed terminal) ask the daemon to stop and restore.

    Installed by the CLI as the first thing ``rswap run`` does, so a signal during start-up is
    kept and answered once the host can be restored, instead of killing the process."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    @property
    def installed(self) -> bool:
        return bool(self._old)

    def install(self) -> StopSignals:
        for s in self.SIGNALS:
            self._old[s] = signal.signal(s, self._on_signal)
        return self

    def _on_signal(self, signum, frame) -> None:
        self.received = signum

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()


class Daemon:
    def __init__(self, config: Config, dry_run: bool = False,
                 drivers: Sequence[Driver] | None = None, out: IO[str] | None = None,
                 mounts=None, hooks: Iterable[Hook] = (), signals: StopSignals | None = None):
        self.config = config
        self.dry_run = dry_run
        self.out = out if out is not None else sys.stdout
        self.state_dir = config.daemon.state_path
        self.lock = Lock(self.state_dir)
        self.journal = Journal(journal_path(self.state_dir))
        self._mounts = mounts
        self._drivers_given = drivers
        self.hooks: list[Hook] = list(hooks)
        self.signals = signals
        self.drivers: dict[Resource, Driver] = {}
        #: resources the configuration names but this host lacks (drivers.MAY_BE_ABSENT): why
        self.missing: dict[Resource, str] = {}
        #: resource key -> overflow counter -> events its collector dropped (a BPF map was full)
        self.bpf_overflow: dict[str, dict[str, int]] = {}
        dc = config.daemon
        self.pool = ResourcePool()
        self.profiler = TaskProfiler(self._forecaster_for, history=dc.history,
                                     interval=dc.interval)
        self.manager = SwapManager(self.pool, headroom=dc.headroom)
        self.manager.policy = StabilityPolicy(dc.hold_ticks, dc.deadband, dc.max_step_down)
        #: held by each tick and by every control-socket request (they run between ticks)
        # Fair: a control request waiting during a tick gets it next, even when ticks overrun.
        self.mutex = FairRLock()
        self.lifecycle = TaskLifecycle(config, self.drivers, self.pool, self.manager,
                                       self.profiler, self.say)
        self.pipeline = pipelinemod.build(self.drivers, self.pool, self.manager, self.profiler,
                                          dc, self.say, self._note_overflow)
        self.tick_no = 0
        self.last_report: TickReport | None = None
        self.on_tick: Callable[[TickReport], None] | None = None
        self._own_overflow = None
        self._started_hooks: list[Hook] = []
        self._stop_asked = False
        self._stopped: bool | None = None  # set by stop(): whether the host was restored

    # -- what the lifecycle keeps ------------------------------------------------------------
    @property
    def tasks(self) -> dict[str, TaskRuntime]:
        return self.lifecycle.tasks

    @property
    def pending(self) -> dict:
        return self.lifecycle.pending

    @property
    def cgroups(self) -> CgroupManager | None:
        return self.lifecycle.cgroups

    @property
    def applier(self) -> FileApplier | None:
        return self.lifecycle.applier

    @property
    def overflow(self):
        """The overflow hook told of admission shortfalls (runtime.overflow.OverflowHook)."""
        return self.lifecycle.overflow

    @overflow.setter
    def overflow(self, hook) -> None:
        self.lifecycle.overflow = hook

    def _forecaster_for(self, task: str, r: Resource):
        spec = next((t.forecaster for t in self.config.tasks if t.name == task), None)
        if spec is None:
            spec = self.lifecycle.runtime_forecasters.get(task)
        total = self.pool.total(r) if r in self.pool else 1
        # the selection's rolled-up buckets are seconds wide: it counts them in our ticks
        return make_forecaster(spec, scale=max(1, total), tick_s=self.config.daemon.interval)

    # -- the one start path ------------------------------------------------------------------
    def start(self) -> None:
        if self._stopped is not None or self.lock.acquired:
            raise RswapError("this daemon has already run; make a new one")
        try:
            self.lock.acquire()
            self._restore_previous_run()
            mounts = self._mounts or detect_mounts()
            applier = FileApplier(self.journal, dry_run=self.dry_run)
            self.lifecycle.bind(CgroupManager(self.journal, mounts), applier, self.journal)
            self._build_drivers(mounts, applier)
            # Resolve every task before changing anything, so bad input applies nothing.
            resolved = [(t, self.lifecycle.resolve(t)) for t in self.config.tasks]
            self._open_profiles()
            self._start_overflow()
            self.lifecycle.start_configured(resolved)
            for d in self.drivers.values():
                d.open()
            self.publish()  # rswap status answers from the start, before the first tick
            for h in self.hooks:
                h.start(self)
                self._started_hooks.append(h)
        except BaseException:
            self.stop()
            raise

    def _restore_previous_run(self) -> None:
        if not self.journal:
            return
        n = len(self.journal.entries())
        self.say(f"rswap: a previous run left {n} journalled change(s); restoring them first")
        report = self.journal.restore()
        if report.failed:
            raise RswapError("could not restore the previous run's changes: "
                             + "; ".join(report.failed) + " (fix, then rswap restore)")
        self.journal = Journal(journal_path(self.state_dir))

    def _build_drivers(self, mounts, applier: FileApplier) -> None:
        wanted = self.config.resources or {ResourceType.PROCESSOR_CYCLES}
        if self._drivers_given is not None:
            self.drivers.update({d.resource: d for d in self._drivers_given})
        else:
            ctx = drivermod.DriverContext(mounts, self.journal, applier, self.config,
                                          self.dry_run)
            for r in sorted(wanted, key=lambda r: r.key):
                try:
                    self.drivers[r] = drivermod.build(r, ctx)
                except FeatureMissing as err:
                    if r not in drivermod.MAY_BE_ABSENT:
                        raise
                    # Reported as missing (status, doctor), never as zero usage.
                    self.missing[r] = str(err)
                    self.say(f"rswap: {r.key} is missing, the other resources go on: {err}")
        for r, d in self.drivers.items():
            total = self.config.totals.get(r) or d.total()
            self.pool.register_resource(r, total)
            self.pool.monitor_resource(r, d.total if not self.config.totals.get(r) else None)
        # a total the host reports ("auto") is known only now: the minimums must fit it too
        check_minimums({r: self.pool.total(r) for r in self.drivers},
                       [(t.name, t.limits) for t in self.config.tasks])

    def _open_profiles(self) -> None:
        """Persistent profiles (state_dir/profiles.db): tasks start with what earlier runs
        learnt."""
        from rswap_ebpf.predict.store import ProfileStore, Retention

        d = self.config.daemon
        try:
            self.profiler.store = ProfileStore.in_dir(self.state_dir,
                                                      Retention(d.retention_days, d.rollup_s))
            self.profiler.checkpoint_every = d.checkpoint_every
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

    def _start_overflow(self) -> None:
        dc = self.config.daemon
        if not (dc.overflow_command or dc.overflow_url):
            return
        from rswap_ebpf.runtime.overflow import OverflowHook

        hook = OverflowHook(dc.overflow_command, dc.overflow_url, interval_s=dc.overflow_interval,
                            priority_of=lambda t: self.tasks[t].priority
                            if t in self.tasks else None)
        self._own_overflow = self.overflow = self.manager.overflow_hook = hook

    # -- the one stop path -------------------------------------------------------------------
    def stop(self) -> bool:
        """Stop what rswap started and put the host back, once; whether the host was restored.

        Safe to call again (it answers the first call's result) and before :meth:`start`."""
        if self._stopped is not None:
            return self._stopped
        if not self.lock.acquired:
            # Never started (another daemon holds the lock): the journal, status file and pins
            # belong to someone else; touch nothing.
            return True
        for h in reversed(self._started_hooks):
            try:
                h.stop()
            except Exception as err:
                log.warning("stopping %s: %s", type(h).__name__, err)
        self._started_hooks.clear()
        if self.lifecycle.cgroups is not None:
            self.lifecycle.stop_all()
        for d in self.drivers.values():
            try:
                d.close()
            except Exception as err:
                log.warning("closing %s driver: %s", d.resource.key, err)
        if self._own_overflow is not None:
            self._own_overflow.close()
            self.manager.overflow_hook = self._own_overflow = self.overflow = None
        report = self.journal.restore()
        if report.failed:
            self.say("rswap: could not restore: " + "; ".join(report.failed)
                     + " (run rswap restore once fixed)")
        statusmod.unpublish()
        self._close_profiles()
        self.lock.release()
        self.drivers.clear()
        self._stopped = not report.failed
        return self._stopped

    def request_stop(self) -> None:
        """Stop after the tick in progress (what a signal does)."""
        self._stop_asked = True

    @property
    def stopping(self) -> bool:
        return self._stop_asked or (self.signals is not None and self.signals.received is not None)

    def run(self, count: int | None = None) -> int:
        """Start, tick every interval until stopped or ``count`` ticks, stop: the exit status."""
        own = self.signals is None
        if own:
            self.signals = StopSignals().install()
        try:
            if not self.stopping:
                self.start()
                self._loop(count)
        finally:
            restored = self.stop()
            if own:
                self.signals.restore()
        if not restored:
            self.say("rswap: stopped, but the host is NOT restored (see above; then rswap "
                     "restore)")
            return 1
        self.say("rswap: stopped; host restored")
        return 0

    def _loop(self, count: int | None) -> None:
        interval = self.config.daemon.interval
        next_at = time.monotonic() + interval
        clock = SlotClock(interval)
        collector = GcPolicy()
        collector.start()
        while not self.stopping and (count is None or self.tick_no < count):
            delay = next_at - time.monotonic()
            while delay > 0 and not self.stopping:
                time.sleep(min(delay, 0.2))
                delay = next_at - time.monotonic()
            if self.stopping:
                break
            next_at += interval
            if next_at < time.monotonic():  # we fell behind: do not try to catch up
                next_at = time.monotonic() + interval
            with self.mutex:
                report = self.tick(clock.slots(time.monotonic()))
                for h in self._started_hooks:
                    h.tick(report)
            collector.after_tick(len(self.profiler.profiles))

    # -- the tick ----------------------------------------------------------------------------
    def tick(self, slots: int = 1) -> TickReport:
        """One tick; ``slots``: the intervals it stands for by the clock (see SlotClock)."""
        t0 = time.perf_counter()
        self.tick_no += 1
        self.lifecycle.reap_vanished()
        if self.lifecycle.pending:
            self.lifecycle.start_pending()
        live = {n: rt for n, rt in self.tasks.items() if rt.exited is None}
        report = self.pipeline.tick(self.tick_no, {n: rt.cgroup for n, rt in live.items()},
                                    {n: rt.priority for n, rt in live.items()},
                                    between=lambda obs: self.lifecycle.reap(), started=t0,
                                    slots=slots)
        for name, per_r in report.observation.usage.items():
            self.tasks[name].usage = per_r
        self.last_report = report
        self.publish()
        if self.on_tick:
            self.on_tick(report)
        return report

    def _note_overflow(self, r: Resource, dropped: dict[str, int]) -> None:
        """BPF maps are bounded: say when a full map made a collector drop events (the counters
        in its stats map only grow), and keep the totals for ``status``."""
        seen = self.bpf_overflow.setdefault(r.key, {})
        for label, n in dropped.items():
            if n > seen.get(label, 0):
                self.say(f"rswap: {r.key} BPF {label}: {n - seen.get(label, 0)} event(s) not "
                         f"counted this tick ({n} in all); usage reads low until the map drains")
                seen[label] = n

    # -- tasks at run time (control socket, rswap exec) --------------------------------------
    def add_task(self, tc, source: str = "socket", owner_pid: int | None = None,
                 allocate: bool = True) -> TaskRuntime:
        """Start managing ``tc`` (a config.TaskConfig) now; bad input applies nothing."""
        with self.mutex:
            return self.lifecycle.add(tc, source, owner_pid, allocate)

    def remove_task(self, name: str, why: str = "removed") -> dict[Resource, int]:
        """Stop managing ``name``: release its units, undo its limits, drop its cgroup."""
        with self.mutex:
            return self.lifecycle.remove(name, why)

    def apply_allocation(self, name: str, r: Resource) -> None:
        self.lifecycle.apply_allocation(name, r)

    def gpu_placement(self, name: str, limits=None, place: bool = False):
        return self.lifecycle.gpu_placement(name, limits, place)

    # -- output ------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return statusmod.build_status(self)

    def publish(self) -> None:
        statusmod.publish(self.status())

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)
