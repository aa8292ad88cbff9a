"""What ``rswap status`` (and the metrics, and ``top``) read: one dict, and the file it is kept in.

The status file (``RUN_DIR/status.json``) is rewritten atomically after every tick, so a reader
without root (which cannot use the control socket) sees the last tick's figures.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from rswap_ebpf import paths
from rswap_ebpf.host.driver import ReportsRunqueue
from rswap_ebpf.predict.profile import NO_PROFILE

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"


def status_path() -> str:
    return os.path.join(paths.root("RUN_DIR"), STATUS_FILE)


def build_status(d) -> dict[str, Any]:
    """The status of ``d``, a running :class:`~rswap_ebpf.runtime.daemon.Daemon`."""
    pool = {}
    for r, snap in d.pool.get_available_resources().items():
        pool[r.key] = {"unit": r.unit, "total": snap.total_units,
                       "available": snap.available_units, "allocations": dict(snap.allocations)}
    tasks = {}
    rep = d.last_report
    for name, rt in d.tasks.items():
        per = {}
        for r in d.pool.types():
            prof = d.profiler.profiles.get((name, r))
            per[r.key] = {
                "usage": round(rt.usage.get(r, 0.0), 1),
                "forecast": round(rep.forecasts.get(name, {}).get(r, 0.0), 1) if rep else 0.0,
                "allocation": d.pool.allocation(r, name),
                **(prof.describe() if prof else NO_PROFILE),
            }
        tasks[name] = {"priority": rt.priority, "cgroup": rt.cgroup.rel,
                       "pids": len(rt.cgroup.pids()), "exited": rt.exited, "resources": per,
                       "gpu_device": rt.gpu_device}
    return {"pid": os.getpid(), "tick": d.tick_no, "time": time.time(),
            "interval": d.config.daemon.interval, "dry_run": d.dry_run,
            "pool": pool, "tasks": tasks,
            "missing": {r.key: why for r, why in d.missing.items()},
            "pending": {n: why for n, (_, _, why) in d.lifecycle.pending.items()},
            "bpf_overflow": {k: dict(v) for k, v in d.bpf_overflow.items()},
            "runq": next((rq for drv in d.drivers.values() if isinstance(drv, ReportsRunqueue)
                          for rq in [drv.runq_report()] if rq is not None), None),
            "swaps": [{"resource": s.resource.key, "from": s.source, "to": s.target,
                       "units": s.units, "reason": s.reason}
                      for s in (rep.result.swaps if rep else [])],
            "shortfalls": [{"task": s.task, "resource": s.resource.key, "wanted": s.wanted,
                            "granted": s.granted} for s in (rep.result.shortfalls if rep else [])]}


def publish(status: dict[str, Any]) -> None:
    """Write ``status`` to the status file (atomically: readers never see half of it)."""
    path = status_path()
    tmp = path + ".tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(status, f)
        os.replace(tmp, path)
    except OSError as err:
        log.warning("cannot write %s: %s", path, err.strerror)


def unpublish() -> None:
    try:
        os.unlink(status_path())
    except FileNotFoundError:
        pass
