"""Scheduler integration: tasks added at run time, admission with their forecast, a wait queue.

The seed's orchestration: before a task starts, ask the profiler for its predicted needs and have
the swap manager allocate them; when the pool cannot cover them, prioritise, postpone or ask for
more.  Admission, per resource, of a task predicted to need ``need`` units (forecast peak over the
window plus headroom, clamped to its min/max; a task never seen before gets its max, or a fair
share of the pool):

(a run's forecast is taken together with the 90th percentile of the task's stored history, since
the forecast a run left behind describes how it ended, not how the next one starts.)

- ``critical``: may take units that lower tiers hold above their minimums.  It is admitted when
  its minimum can be covered, granted ``min(need, free + lower tiers' excess)``; what is missing is
  a shortfall.
- ``normal`` / ``batch``: admitted only when the free pool covers ``need``; otherwise refused with
  the shortfall, or (``wait``) queued by priority, then arrival, until units are free or the
  timeout passes.  The queue is served in order after every tick and whenever a task leaves; a
  request never overtakes an earlier one of its tier.

Every refusal or queued request is reported to the overflow hook (event ``admission``).  The
control socket's requests arrive here (:meth:`Scheduler.dispatch`) on the server thread and run
under the daemon's lock, between ticks.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from rswap_ebpf.runtime.config import TaskConfig, parse_task_limits
from rswap_ebpf.server.control import Deferred, Peer, error_reply
from rswap_ebpf.host.cgroup import check_task_name
from rswap_ebpf.errors import ConfigError, RswapError
from rswap_ebpf.predict.registry import make_forecaster
from rswap_ebpf.model.resources import Resource, ResourceType
from rswap_ebpf.model.limits import Limits, Priority
from rswap_ebpf.model.checks import check_number
from rswap_ebpf.model.stats import quantile
from rswap_ebpf.swap.manager import Shortfall

log = logging.getLogger(__name__)

#: resources whose limit needs a per-task target (device, interface) given in the config file
_NEEDS_TARGET = {ResourceType.STORAGE_IOPS, ResourceType.NETWORK_BANDWIDTH}


@dataclass(frozen=True)
class ExecRequest:
    name: str
    priority: Priority
    forecaster: Any
    limits: dict[Resource, Limits]
    wait: bool = False
    timeout_s: float | None = None


@dataclass(frozen=True)
class Admission:
    admitted: bool
    need: dict[Resource, int]
    grant: dict[Resource, int]
    shortfalls: tuple[Shortfall, ...]
    predicted: dict[Resource, float | None]


@dataclass(order=True)
class _Waiter:
    priority: int
    seq: int
    req: ExecRequest = field(compare=False)
    peer: Peer = field(compare=False)
    deferred: Deferred = field(compare=False)
    since: float = field(compare=False)
    deadline: float | None = field(compare=False)


def load_forecaster(spec) -> None:
    """Build (and drop) a forecaster of ``spec`` so its libraries are imported, outside the
    daemon's lock: ticks go on meanwhile.  A bad spec is left for the request to report."""
    try:
        make_forecaster(spec)
    except Exception:  # noqa: BLE001 (validated, and reported, under the lock)
        pass


def parse_limits(raw: dict, pool_types, where: str) -> dict[Resource, Limits]:
    """``{"cpu": {"min": 200}, "coproc:fpga0": {"max": 2}}`` (or ``"coproc": {"fpga0": {...}}``)
    for resources the daemon manages."""
    if not isinstance(raw, dict):
        raise ConfigError(where, "expected {RESOURCE: {\"min\": UNITS, \"max\": UNITS}, ...}")
    out, _ = parse_task_limits(raw, where)
    for r in out:
        if r in _NEEDS_TARGET:
            raise ConfigError(f"{where}.{r.key}", "per-device limits need a [[task]] in the "
                              "configuration file (device/interface); not at run time")
        if r not in pool_types:
            raise ConfigError(f"{where}.{r.key}", f"the daemon does not manage {r.key} "
                              f"(it manages: {', '.join(t.key for t in pool_types)})")
    return out


class Scheduler:
    """Answers the control socket for a running :class:`~rswap_ebpf.runtime.daemon.Daemon`."""

    def __init__(self, daemon, overflow=None):
        self.daemon = daemon
        self.overflow = overflow
        self.queue: list[_Waiter] = []
        self._seq = itertools.count()

    # -- the protocol ------------------------------------------------------------------------
    def dispatch(self, req: dict, peer: Peer) -> dict | Deferred:
        op = req["op"]
        handler = {"status": self._status, "task.list": self._task_list,
                   "task.add": self._task_add, "task.remove": self._task_remove,
                   "exec.allocate": self._exec_allocate, "exec.release": self._task_remove,
                   }.get(op)
        if handler is None:
            return error_reply(f"unknown op {op!r} (status, task.list, task.add, task.remove, "
                               "exec.allocate, exec.release)")
        if op in ("task.add", "exec.allocate"):
            load_forecaster(req.get("forecaster"))
        with self.daemon.mutex:
            return handler(req, peer)

    def warm_up(self) -> threading.Thread:
        """Import the default forecaster's libraries in the background while the daemon ticks.

        The first ``auto`` forecaster imports River and SciPy: about a second here, half a minute
        in an emulated VM, which a scheduler's first ``rswap exec`` would otherwise wait out.
        """
        t = threading.Thread(target=load_forecaster, args=(None,), name="rswap-warm-up",
                             daemon=True)
        t.start()
        return t

    def _status(self, req, peer) -> dict:
        st = self.daemon.status()
        st["queue"] = [{"name": w.req.name, "priority": w.req.priority.name.lower(),
                        "waiting_s": round(time.monotonic() - w.since, 1)} for w in sorted(self.queue)]
        return {"ok": True, "status": st}

    def _task_list(self, req, peer) -> dict:
        d = self.daemon
        out = []
        for name, rt in d.tasks.items():
            if rt.exited is not None:
                continue
            out.append({"name": name, "priority": rt.priority, "cgroup": rt.cgroup.rel,
                        "pids": len(rt.cgroup.pids()), "source": rt.source,
                        "allocation": {r.key: d.pool.allocation(r, name) for r in d.pool.types()}})
        return {"ok": True, "tasks": out,
                "queued": [w.req.name for w in sorted(self.queue)]}

    def _task_add(self, req, peer) -> dict:
        from rswap_ebpf.runtime.config import _task, check_minimums

        raw = {k: v for k, v in req.items() if k not in ("op", "id")}
        tc = _task(raw, "task", self.daemon.config.daemon.interval)
        for r in tc.limits:
            if r in _NEEDS_TARGET or r not in self.daemon.pool:
                raise ConfigError(f"task {tc.name}.{r.key}", "not managed at run time here")
        self._check_free_name(tc.name)
        d = self.daemon
        check_minimums({r: d.pool.total(r) for r in tc.limits},
                       [(t.name, t.limits) for t in d.manager.tasks.values()]
                       + [(tc.name, tc.limits)])
        self.daemon.add_task(tc, source="socket")
        d = self.daemon
        return {"ok": True, "task": tc.name, "cgroup": d.tasks[tc.name].cgroup.rel,
                "allocation": {r.key: d.pool.allocation(r, tc.name) for r in d.pool.types()}}

    def _task_remove(self, req, peer) -> dict:
        name = check_task_name(req.get("name"), "name")
        if name not in self.daemon.tasks:
            for w in list(self.queue):
                if w.req.name == name:
                    self.queue.remove(w)
                    w.deferred.resolve(error_reply(f"task {name}: removed while waiting"))
                    return {"ok": True, "released": {}}
            raise RswapError(f"no task named {name!r}")
        released = self.daemon.remove_task(name, "released" if req["op"] == "exec.release"
                                           else "removed")
        self.serve_queue()
        return {"ok": True, "released": {r.key: u for r, u in released.items()}}

    def _exec_allocate(self, req, peer) -> dict | Deferred:
        d = self.daemon
        name = check_task_name(req.get("name"), "name")
        prio = Priority.parse(req.get("priority", "normal"))
        fc = req.get("forecaster")
        make_forecaster(fc, field="forecaster", tick_s=d.config.daemon.interval)
        limits = parse_limits(req.get("limits") or {}, d.pool.types(), "limits")
        timeout = req.get("timeout")
        if timeout is not None:
            check_number(timeout, "timeout", 0)
        self._check_free_name(name)
        er = ExecRequest(name, prio, fc, limits, bool(req.get("wait")), timeout)
        plan = self.plan(er)
        if plan.admitted:
            return self._admit(er, peer, plan, waited_s=0.0)
        if self.overflow is not None:
            self.overflow.submit("admission", plan.shortfalls, {name: prio.name.lower()})
        if not er.wait:
            return error_reply(self._refusal(er, plan),
                               shortfall=_shortfall_json(plan.shortfalls))
        w = _Waiter(int(prio), next(self._seq), er, peer, Deferred(), time.monotonic(),
                    None if timeout is None else time.monotonic() + timeout)
        w.deferred.on_cancel = lambda w=w: self._cancel(w)
        self.queue.append(w)
        log.info("exec %s (%s) queued: %s", name, prio.name.lower(), self._refusal(er, plan))
        return w.deferred

    def _check_free_name(self, name: str) -> None:
        rt = self.daemon.tasks.get(name)
        if rt is not None and rt.exited is None:
            raise ConfigError("name", f"a task named {name!r} is already running")
        if any(w.req.name == name for w in self.queue):
            raise ConfigError("name", f"a task named {name!r} is already waiting")

    # -- admission -----------------------------------------------------------------------
    def plan(self, er: ExecRequest) -> Admission:
        d = self.daemon
        pool, mgr = d.pool, d.manager
        d.profiler.restore(er.name)  # what earlier runs of NAME taught the forecaster
        preds = d.profiler.get_predicted_needs(er.name, d.config.daemon.window)
        active = [n for n, rt in d.tasks.items() if rt.exited is None]
        need, grant, predicted, short = {}, {}, {}, []
        admitted = True
        for r in pool.types():
            if r is ResourceType.GPU_MEMORY:
                continue  # admitted per device, below
            lim = er.limits.get(r, Limits())
            p = preds.get(r)
            prof = d.profiler.profiles.get((er.name, r))
            if p is not None:
                # The forecast left by its last run describes how that run ended; a start needs
                # what the task usually holds at its busy times: the 90th percentile of its past.
                busy = quantile(prof.history, 0.9, "lower") if prof is not None else 0.0
                predicted[r] = round(max(p.peak, busy), 1)
                units = lim.clamp(math.ceil(max(0.0, predicted[r]) * (1 + mgr.headroom)))
            else:
                predicted[r] = None
                fair = pool.total(r) // (len(active) + 1)
                units = lim.clamp(lim.max_units if lim.max_units is not None else fair)
            need[r] = units
            free = pool.available(r)
            if er.priority is Priority.CRITICAL:
                spare = sum(max(0, pool.allocation(r, t.name) - t.limit(r).min_units)
                            for t in mgr.tasks.values() if t.priority > er.priority)
                can = free + spare
                grant[r] = min(units, can)
                if can < lim.min_units:
                    admitted = False
            else:
                grant[r] = units if units <= free else free
                if units > free:
                    admitted = False
            if grant[r] < units:
                short.append(Shortfall(er.name, r, units, grant[r]))
        # GPU memory cannot be taken back from a running process: every tier waits for a device
        # whose free memory covers the forecast (drivers/gpu.py), none preempts.
        gp = d.gpu_placement(er.name, er.limits.get(ResourceType.GPU_MEMORY))
        if gp is not None:
            r = ResourceType.GPU_MEMORY
            need[r], predicted[r] = gp.need_bytes, gp.predicted_bytes
            grant[r] = gp.need_bytes if gp.fits else max(0, gp.room_bytes)
            if not gp.fits:
                admitted = False
                short.append(Shortfall(er.name, r, gp.need_bytes, grant[r]))
        return Admission(admitted, need, grant, tuple(short), predicted)

    def _admit(self, er: ExecRequest, peer: Peer, plan: Admission, waited_s: float) -> dict:
        d = self.daemon
        tc = TaskConfig(er.name, er.priority, (), None, (), er.forecaster, dict(er.limits))
        rt = d.add_task(tc, source="exec", owner_pid=peer.pid, allocate=False)
        preempted = []
        for r, units in plan.grant.items():
            if not units:
                continue
            for src, take in d.manager.find_available_swap(er.name, r, units):
                d.manager.swap_resources(er.name, r, take, src)
                if src is not None:
                    preempted.append({"from": src, "resource": r.key, "units": take})
                    d.apply_allocation(src, r)
            d.apply_allocation(er.name, r)
        # The grant stands until the task has real samples: its first ticks read ~0 while it
        # starts, and the anti-thrash policy would otherwise hand the grant back meanwhile.
        d.manager.hold_admission(er.name, {r: d.pool.allocation(r, er.name)
                                           for r in plan.grant})
        if plan.shortfalls and self.overflow is not None:
            self.overflow.submit("admission", plan.shortfalls,
                                 {er.name: er.priority.name.lower()})
        alloc = {r.key: d.pool.allocation(r, er.name) for r in d.pool.types()}
        d.say(f"rswap: exec {er.name} ({er.priority.name.lower()}) admitted with "
               + ", ".join(f"{k} {v}" for k, v in alloc.items())
               + "".join(f"; took {p['units']} {p['resource']} from {p['from']}" for p in preempted))
        return {"ok": True, "task": er.name, "cgroup": rt.cgroup.rel,
                "procs": [os.path.join(x, "cgroup.procs") for x in rt.cgroup.dirs.values()],
                "allocation": alloc,
                "predicted": {r.key: v for r, v in plan.predicted.items()},
                "shortfall": _shortfall_json(plan.shortfalls),
                "preempted": preempted, "waited_s": round(waited_s, 2),
                "gpu_device": rt.gpu_device, "env": dict(rt.env)}

    def _refusal(self, er: ExecRequest, plan: Admission) -> str:
        parts = []
        for s in plan.shortfalls:
            free = self.daemon.pool.available(s.resource)
            where = ""
            if s.resource is ResourceType.GPU_MEMORY:
                free, where = s.granted, " on the roomiest GPU"
            parts.append(f"{s.resource.key}: predicted to need {s.wanted} {s.resource.unit}, "
                         f"{free} free{where}")
        how = ("its minimum cannot be covered even from lower tiers" if er.priority is
               Priority.CRITICAL else "the pool cannot cover it")
        return (f"task {er.name} ({er.priority.name.lower()}) not started, {how}: "
                + "; ".join(parts) + " (use --wait, a higher --priority, a lower --min, or add "
                "capacity)")

    def serve_queue(self) -> None:
        """Admit waiting requests in order; expire those past their timeout (under the lock)."""
        now = time.monotonic()
        for w in list(self.queue):
            if w.deadline is not None and now >= w.deadline:
                self.queue.remove(w)
                plan = self.plan(w.req)
                w.deferred.resolve(error_reply(
                    f"timed out after {now - w.since:.1f}s waiting: " + self._refusal(w.req, plan),
                    shortfall=_shortfall_json(plan.shortfalls)))
        for w in sorted(self.queue):
            plan = self.plan(w.req)
            if not plan.admitted:
                break  # no overtaking
            self.queue.remove(w)
            try:
                reply = self._admit(w.req, w.peer, plan, time.monotonic() - w.since)
            except RswapError as err:
                reply = error_reply(err)
            w.deferred.resolve(reply)

    def _cancel(self, w: _Waiter) -> None:
        with self.daemon.mutex:
            if w in self.queue:
                self.queue.remove(w)

    def close(self) -> None:
        for w in self.queue:
            w.deferred.resolve(error_reply("rswap is stopping"))
        self.queue.clear()


def _shortfall_json(shortfalls) -> list[dict]:
    return [{"task": s.task, "resource": s.resource.key, "unit": s.resource.unit,
             "wanted": s.wanted, "granted": s.granted, "missing": s.missing} for s in shortfalls]
