"""Configuration: a TOML file (or the embedded demo), validated into typed dataclasses.

Every error names the field it is about (``task[1].cpu.min: must not be negative``) and is raised
before anything is applied.
"""
from __future__ import annotations

import os
import sys
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources as importlib_resources
from typing import Any

from rswap_ebpf import paths
from rswap_ebpf.host.cgroup import check_task_name
from rswap_ebpf.errors import ConfigError
from rswap_ebpf.predict.registry import make_forecaster
from rswap_ebpf.model.resources import (MULTI_INSTANCE, Resource, ResourceId, ResourceType, check_instance_name,
                        check_units, parse_resource)
from rswap_ebpf.host.process import is_kernel_thread
from rswap_ebpf.model.limits import Limits, Priority
from rswap_ebpf.model.checks import check_bool, check_number

DEFAULT_CONFIG = "default.toml"
KILL_MODES = ("stop", "keep")


@dataclass(frozen=True)
class DaemonConfig:
    interval: float = 1.0
    window: int = 5
    headroom: float = 0.2
    state_dir: str = ""
    history: int = 600
    retention_days: float = 7.0    # profile history kept in state_dir/profiles.db
    rollup_s: int = 300            # ...downsampled to buckets of this many seconds
    checkpoint_every: int = 60     # ticks between forecaster checkpoints (samples every tick)
    hold_ticks: int = 2            # a falling demand is applied after this many low ticks
    deadband: float = 0.1          # ...and only when it falls by more than this fraction
    max_step_down: float = 0.25    # ...by at most this (fraction of the pool if < 1) per tick
    overflow_command: tuple[str, ...] = ()  # told the shortfall (JSON on stdin)
    overflow_url: str = ""         # ...or POSTed it
    overflow_interval: float = 60.0  # seconds between reports of an unchanged shortfall
    critical_floor: float = 0.9    # critical tasks keep this quantile of a season's forecast (0: off)
    critical_season: int = 0       # ...a season of this many ticks (0: the forecaster's period)
    #: what happens to the commands rswap started when it stops or dies: "stop" (the default:
    #: they go with it), or "keep" (they run on, unmanaged, as systemd's KillMode=none)
    kill_mode: str = "stop"

    @property
    def state_path(self) -> str:
        return self.state_dir or paths.root("STATE_DIR")


@dataclass(frozen=True)
class TaskConfig:
    name: str
    priority: Priority = Priority.NORMAL
    command: tuple[str, ...] = ()
    cgroup: str | None = None
    pids: tuple[int, ...] = ()
    forecaster: Any = None
    limits: dict[Resource, Limits] = field(default_factory=dict)
    #: what a per-device resource applies to: io -> BlockDevice, net -> Iface (TASK_TARGETS)
    targets: dict[Resource, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig
    totals: dict[Resource, int | None]
    tasks: tuple[TaskConfig, ...]
    source: str = "<embedded default>"
    #: per-resource settings besides ``total`` (RESOURCE_OPTIONS), e.g. the co-processor's probe
    options: dict[Resource, dict[str, Any]] = field(default_factory=dict)

    @property
    def resources(self) -> set[Resource]:
        return set(self.totals) | {r for t in self.tasks for r in t.limits}


def load(path: str | None = None) -> Config:
    """Load ``path`` or, when None, the embedded default (the demo)."""
    if path is None:
        text = importlib_resources.files("rswap_ebpf.data").joinpath(DEFAULT_CONFIG).read_text()
        source = "<embedded default>"
    else:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as err:
            raise ConfigError("--config", f"cannot read {path}: {err.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError("--config", f"{path} is not UTF-8 text") from None
        source = path
    return parse(text, source)


def parse(text: str, source: str = "<string>") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(source, f"not valid TOML: {err}") from None
    _only(data, {"daemon", "resources", "task"}, "")
    daemon = _daemon(data.get("daemon", {}))
    tables = _resource_tables(data.get("resources", {}))
    totals = _resources(tables)
    raw_tasks = data.get("task", [])
    if not isinstance(raw_tasks, list):
        raise ConfigError("task", "must be an array of tables ([[task]])")
    tasks = []
    names: set[str] = set()
    for i, raw in enumerate(raw_tasks):
        t = _task(raw, f"task[{i}]", daemon.interval)
        if t.name in names:
            raise ConfigError(f"task[{i}].name", f"{t.name!r} is used twice")
        names.add(t.name)
        _check_registered(t, totals)
        tasks.append(t)
    check_minimums({r: n for r, n in totals.items() if n is not None},
                   [(t.name, t.limits) for t in tasks])
    return Config(daemon, totals, tuple(tasks), source, _resource_options(tables))


def check_minimums(totals: Mapping[Resource, int],
                   tasks: Iterable[tuple[str, Mapping[Resource, Limits]]]) -> None:
    """Refuse minimums that add up to more than a resource's total: they could never all be
    granted, so some task's floor would silently not hold."""
    tasks = list(tasks)
    for r, total in totals.items():
        mins = [(name, lim[r].min_units) for name, lim in tasks if r in lim and lim[r].min_units]
        need = sum(m for _, m in mins)
        if need > total:
            who = ", ".join(f"{name} {m}" for name, m in mins)
            raise ConfigError(f"{r.key}.min", f"the tasks' minimums add up to {need} {r.unit} "
                              f"({who}), more than the total {total}: lower them or raise the "
                              f"total")


def _only(table: dict, allowed: set[str], where: str) -> None:
    if not isinstance(table, dict):
        raise ConfigError(where or "config", "must be a table")
    for key in table:
        if key not in allowed:
            prefix = f"{where}." if where else ""
            raise ConfigError(f"{prefix}{key}", f"unknown setting (known: {', '.join(sorted(allowed))})")


_number = check_number


def _daemon(d: Any) -> DaemonConfig:
    _only(d, {"interval", "window", "headroom", "state_dir", "history", "retention_days",
              "rollup_s", "checkpoint_every", "hold_ticks", "deadband", "max_step_down",
              "overflow_command", "overflow_url", "overflow_interval", "critical_floor",
              "critical_season", "kill_mode"}, "daemon")
    interval = _number(d.get("interval", 1.0), "daemon.interval", 0.05, 3600)
    window = int(_number(d.get("window", 5), "daemon.window", 1, 10000))
    headroom = _number(d.get("headroom", 0.2), "daemon.headroom", 0.0, 10.0)
    history = int(_number(d.get("history", 600), "daemon.history", 10, 10_000_000))
    state_dir = d.get("state_dir", "")
    if not isinstance(state_dir, str) or "\x00" in state_dir:
        raise ConfigError("daemon.state_dir", "must be a path")
    retention_days = _number(d.get("retention_days", 7.0), "daemon.retention_days", 0.01, 3650)
    rollup_s = int(_number(d.get("rollup_s", 300), "daemon.rollup_s", 1, 86400))
    checkpoint_every = int(_number(d.get("checkpoint_every", 60), "daemon.checkpoint_every",
                                   1, 1_000_000))
    hold_ticks = int(_number(d.get("hold_ticks", 2), "daemon.hold_ticks", 0, 1000))
    deadband = _number(d.get("deadband", 0.1), "daemon.deadband", 0.0, 0.99)
    max_step_down = _number(d.get("max_step_down", 0.25), "daemon.max_step_down", 0.001)
    overflow_command = (_argv_option(d["overflow_command"], "daemon.overflow_command")
                        if "overflow_command" in d else ())
    overflow_url = d.get("overflow_url", "")
    if overflow_url:
        from rswap_ebpf.runtime.overflow import check_url

        check_url(overflow_url)
    overflow_interval = _number(d.get("overflow_interval", 60.0), "daemon.overflow_interval",
                                0.0, 86400)
    critical_floor = _number(d.get("critical_floor", 0.9), "daemon.critical_floor", 0.0, 1.0)
    critical_season = int(_number(d.get("critical_season", 0), "daemon.critical_season", 0, 100000))
    kill_mode = d.get("kill_mode", "stop")
    if kill_mode not in KILL_MODES:
        raise ConfigError("daemon.kill_mode", f"{kill_mode!r} is not one of "
                          f"{', '.join(KILL_MODES)} (stop: the commands rswap started stop with "
                          "it; keep: they run on)")
    return DaemonConfig(interval, window, headroom, state_dir, history, retention_days, rollup_s,
                        checkpoint_every, hold_ticks, deadband, max_step_down, overflow_command,
                        overflow_url, overflow_interval, critical_floor=critical_floor,
                        critical_season=critical_season, kill_mode=kill_mode)


def _resource_tables(d: Any) -> list[tuple[Resource, dict, str]]:
    """``[resources.<key>]`` tables as (resource, table, where), a co-processor's named
    sub-tables (``[resources.coproc.fpga0]``) each as its own resource."""
    if not isinstance(d, dict):
        raise ConfigError("resources", "must be a table")
    out = []
    for key, table in d.items():
        r = ResourceType.parse(key, f"resources.{key}")
        where = f"resources.{key}"
        if not isinstance(table, dict):
            raise ConfigError(where, "must be a table")
        named = _named_instances(r, table, where, "total, probe... in this table",
                                 f"a [{where}.<name>] table each")
        if named is None:
            out.append((r, table, where))
        elif not named:
            raise ConfigError(where, "register a co-processor: total and probe here, or one "
                              "[resources.coproc.<name>] table each")
        else:
            out.extend(named)
    return out


def _named_instances(r: ResourceType, table: dict, where: str, plain_form: str, named_form: str
                     ) -> list[tuple[Resource, dict, str]] | None:
    """A table of a MULTI_INSTANCE type that holds only tables: one entry per named instance;
    None for the plain form (the type's one resource).  Both at once is an error."""
    if r not in MULTI_INSTANCE:
        return None
    subs = [k for k, v in table.items() if isinstance(v, dict)]
    if not subs:
        return None if table else []
    if len(subs) != len(table):
        plain = sorted(set(table) - set(subs))
        raise ConfigError(where, f"give one unnamed {r.key} ({plain_form}) or named ones "
                          f"({named_form}), not both: move {', '.join(plain)} into a named table")
    return [(ResourceId(r, check_instance_name(n, f"{where}.{n}")), table[n], f"{where}.{n}")
            for n in subs]


def _resources(tables: list[tuple[Resource, dict, str]]) -> dict[Resource, int | None]:
    out: dict[Resource, int | None] = {}
    for r, table, where in tables:
        allowed = {"total"} | set(RESOURCE_OPTIONS.get(r.type, {}))
        if r.instance:  # a named co-processor's name is its table's key, not a setting
            allowed.discard("name")
        _only(table, allowed, where)
        total = table.get("total", "auto")
        out[r] = None if total == "auto" else check_units(total, f"{where}.total", r)
    return out


_bool_option = check_bool


def _argv_option(value: Any, field_name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        raise ConfigError(field_name, "must be a list of arguments, e.g. [\"/usr/bin/probe\", \"--all\"]")
    if not isinstance(value, list) or not value or not all(
            isinstance(a, str) and a and "\x00" not in a for a in value):
        raise ConfigError(field_name, "must be a non-empty list of strings")
    return tuple(a.replace("{python}", sys.executable) for a in value)


def _name_option(value: Any, field_name: str) -> str:
    return check_task_name(value, field_name)


def _indices_option(value: Any, field_name: str) -> tuple[int | str, ...]:
    """GPU devices: NVML indices or UUIDs (``GPU-…``, ``MIG-…``; indices need not be stable)."""
    if not isinstance(value, list) or not all(
            (isinstance(i, int) and not isinstance(i, bool) and i >= 0)
            or (isinstance(i, str) and i.startswith(("GPU-", "MIG-"))) for i in value):
        raise ConfigError(field_name, "must be a list of device UUIDs (GPU-…, MIG-…) or "
                          "indices (0, 1, ...)")
    return tuple(value)


#: settings a ``[resources.<key>]`` table may carry besides ``total``, and their validators
#: (by resource type: every named co-processor takes the co-processor's settings).
RESOURCE_OPTIONS: dict[ResourceType, dict[str, Any]] = {
    ResourceType.PROCESSOR_CYCLES: {  # drivers.cpu.TIER_SHAPES: what each tier adds to its quota
        "critical_burst": _bool_option, "batch_idle": _bool_option,
        "critical_weight": lambda v, f: _number(v, f, 1.0, 1000.0),
        # enforce.cpuset: lower tiers leave the critical tier whole cores during a burst
        "critical_isolate": _bool_option,
        "critical_isolate_above": lambda v, f: _number(v, f, 1.0, 1e6)},
    ResourceType.CACHE: {"isolate_default": _bool_option},
    ResourceType.NETWORK_BANDWIDTH: {"ingress": _bool_option},  # drivers.net: shape via an ifb
    ResourceType.MEMORY_BANDWIDTH: {
        "peak_bytes_per_s": lambda v, f: _number(v, f, 1.0)},
    ResourceType.GPU_MEMORY: {"devices": _indices_option, "mps": _bool_option},
    ResourceType.SPECIALIZED_COPROC: {
        "name": _name_option, "probe": _argv_option, "apply": _argv_option,
        "timeout": lambda v, f: _number(v, f, 0.1, 600)},
}


def _resource_options(tables: list[tuple[Resource, dict, str]]) -> dict[Resource, dict[str, Any]]:
    out: dict[Resource, dict[str, Any]] = {}
    for r, table, where in tables:
        for opt, check in RESOURCE_OPTIONS.get(r.type, {}).items():
            if opt in table:
                out.setdefault(r, {})[opt] = check(table[opt], f"{where}.{opt}")
        if r.type is ResourceType.SPECIALIZED_COPROC:
            if r.instance:
                out.setdefault(r, {})["name"] = r.instance
            if "probe" not in out.get(r, {}):
                raise ConfigError(f"{where}.probe", "a co-processor needs a probe command "
                                  "that prints its usage per task")
            if table.get("total", "auto") == "auto":
                raise ConfigError(f"{where}.total", "give the co-processor's total units")
    return out


def _check_registered(task: TaskConfig, totals: dict[Resource, int | None]) -> None:
    """A task's co-processor limit names one the configuration registers."""
    for r in task.limits:
        if r.type not in MULTI_INSTANCE or r in totals:
            continue
        names = sorted(x.instance for x in totals if x.type is r.type and x.instance)
        if r.instance:
            known = (f"registered: {', '.join(names)}" if names else
                     f"none is named; register [resources.{r.type.key}.{r.instance}]")
            raise ConfigError(f"task {task.name}.{r.key}", f"no {r.type.key} named "
                              f"{r.instance!r} ({known})")
        if names:
            raise ConfigError(f"task {task.name}.{r.key}", "name the co-processor: "
                              f"{r.type.key} = {{ {names[0]} = {{ min = 1 }} }} (registered: "
                              f"{', '.join(names)})")
        raise ConfigError(f"task {task.name}.{r.key}", f"no {r.type.key} is registered "
                          f"([resources.{r.type.key}] with total and probe)")


def parse_task_limits(raw: dict, where: str, targets: dict[ResourceType, str] | None = None
                      ) -> tuple[dict[Resource, Limits], dict[Resource, dict]]:
    """A task's resource tables (``cpu = {min = 200}``, ``coproc = {fpga0 = {max = 2}}`` or
    ``"coproc:fpga0" = {max = 2}``) as limits, and each resource's table for its other keys
    (``targets``: resource type -> the one extra key it takes, e.g. io -> device)."""
    limits: dict[Resource, Limits] = {}
    tables: dict[Resource, dict] = {}
    for key in raw:
        base = parse_resource(key, f"{where}.{key}")
        table = raw[key]
        if not isinstance(table, dict):
            raise ConfigError(f"{where}.{key}", "expected a table: {min = UNITS, max = UNITS}")
        entries = _named_instances(base, table, f"{where}.{key}", "min, max",
                                   "fpga0 = {min, max}, ...") \
            if isinstance(base, ResourceType) else None
        for r, sub, at in entries if entries is not None else [(base, table, f"{where}.{key}")]:
            if r in limits:
                raise ConfigError(at, f"{r.key} is given twice")
            extra = (targets or {}).get(r.type)
            _only(sub, {"min", "max"} | ({extra} if extra else set()), at)
            lo = check_units(sub.get("min", 0), f"{at}.min", r)
            hi = sub.get("max")
            hi = None if hi is None else check_units(hi, f"{at}.max", r)
            if hi is not None and hi < lo:
                raise ConfigError(f"{at}.max", f"{hi} is below min {lo}")
            limits[r] = Limits(lo, hi)
            tables[r] = sub
    return limits, tables


def is_resource_key(key: str) -> bool:
    """``cpu``, ``coproc`` or ``coproc:fpga0``: a key a task table may give limits under."""
    try:
        parse_resource(key)
    except ConfigError:
        return False
    return True


def _task(raw: Any, where: str, tick_s: float | None = None) -> TaskConfig:
    if not isinstance(raw, dict):
        raise ConfigError(where, "must be a table")
    fields = {"name", "priority", "command", "cgroup", "pids", "forecaster"}
    # "coproc:x" is a resource key: parse_task_limits says what is wrong with a bad one
    _only(raw, fields | {k for k in raw if ":" in str(k) or is_resource_key(k)}, where)
    name = check_task_name(raw.get("name"), f"{where}.name")
    where = f"task {name}" if name else where
    priority = Priority.parse(raw.get("priority", "normal"), f"{where}.priority")
    command = raw.get("command", [])
    if isinstance(command, str):
        raise ConfigError(f"{where}.command", "must be a list of arguments, e.g. [\"nginx\", \"-g\", ...]")
    if not isinstance(command, list) or not all(isinstance(a, str) and "\x00" not in a for a in command):
        raise ConfigError(f"{where}.command", "must be a list of strings")
    command = tuple(a.replace("{python}", sys.executable) for a in command)
    cgroup = raw.get("cgroup")
    if cgroup is not None:
        if not isinstance(cgroup, str) or not cgroup.strip("/") or "\x00" in cgroup:
            raise ConfigError(f"{where}.cgroup", f"{cgroup!r} is not a cgroup path")
        if any(part == ".." for part in cgroup.split("/")):
            raise ConfigError(f"{where}.cgroup", f"{cgroup!r} climbs out of the cgroup mount")
        if os.path.normpath(cgroup.strip("/")) == ".":
            raise ConfigError(f"{where}.cgroup", f"{cgroup!r} is the root cgroup: limiting it "
                              "would limit the whole host; name the task's own cgroup")
    pids = raw.get("pids", [])
    if not isinstance(pids, list) or not all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in pids):
        raise ConfigError(f"{where}.pids", "must be a list of positive process ids")
    for pid in pids:
        if not os.path.exists(os.path.join(paths.root("PROCFS_ROOT"), str(pid))):
            raise ConfigError(f"{where}.pids", f"no process with pid {pid}")
        if is_kernel_thread(pid):
            raise ConfigError(f"{where}.pids", f"pid {pid} is a kernel thread, which no cgroup "
                              "can hold; remove it from pids")
    if sum(bool(x) for x in (command, cgroup, pids)) != 1:
        raise ConfigError(where, "give exactly one of command, cgroup or pids")
    forecaster = raw.get("forecaster")
    make_forecaster(forecaster, field=f"{where}.forecaster", tick_s=tick_s)  # validate now
    limits, tables = parse_task_limits({k: v for k, v in raw.items() if k not in fields}, where,
                                       TASK_TARGETS)
    targets: dict[Resource, Any] = {}
    for r, table in tables.items():
        target_key = TASK_TARGETS.get(r.type)
        if target_key:
            targets[r] = _task_target(r, table.get(target_key), f"{where}.{r.key}.{target_key}")
    return TaskConfig(name, priority, command, cgroup, tuple(pids), forecaster, limits, targets)


#: per-device resources: the key naming what a task's limit applies to.
TASK_TARGETS: dict[ResourceType, str] = {
    ResourceType.STORAGE_IOPS: "device",
    ResourceType.NETWORK_BANDWIDTH: "interface",
}


def _task_target(r: ResourceType, value: Any, field_name: str) -> Any:
    """Resolve io.device / net.interface now, so a bad name stops the run before any change."""
    if value is None:
        what = "block device (/dev/sdb, sdb or 8:16)" if r is ResourceType.STORAGE_IOPS else \
            "interface (eth0, or netns:eth0)"
        raise ConfigError(field_name, f"name the {what} this limit applies to")
    if r is ResourceType.STORAGE_IOPS:
        from rswap_ebpf.host.io.enforcer import resolve_device

        return resolve_device(value, field_name)
    from rswap_ebpf.host.net.tc import parse_iface

    return parse_iface(value, field_name)
