"""The swap manager: who gets how many units of each resource, and why.

Targets come from forecasts (sense -> predict -> **swap** -> enforce): each task is given its
forecast plus headroom, clamped to its configured min/max.  The pool is served in priority tiers
(critical, then normal, then batch); every task's minimum is guaranteed first; inside a tier a short
pool is shared max-min fairly.  Units a lower tier holds above its minimum are swapped to a higher
tier that needs them, never the other way round.  What cannot be granted is reported as a
:class:`Shortfall` and passed to the overflow hook (the way to ask a cluster for more).
"""
from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from rswap_ebpf.errors import ConfigError, ResourceError
from rswap_ebpf.model.limits import Limits, Priority
from rswap_ebpf.model.resources import Resource, ResourcePool, check_units
from rswap_ebpf.swap import columns
from rswap_ebpf.swap.policy import StabilityPolicy

log = logging.getLogger(__name__)


_NO_LIMITS = Limits()  # frozen: one shared instance for every resource a task names no limits for


@dataclass(frozen=True)
class ManagedTask:
    name: str
    priority: Priority
    limits: Mapping[Resource, Limits] = field(default_factory=dict)

    def limit(self, r: Resource) -> Limits:
        return self.limits.get(r, _NO_LIMITS)


@dataclass(frozen=True)
class Change:
    """One task's allocation of one resource moved from ``old`` to ``new`` units."""

    task: str
    resource: Resource
    old: int
    new: int
    reason: str  # forecast | saturated | priority | reclaim | release | swap


@dataclass(frozen=True)
class Swap:
    """Units taken from ``source`` (a lower tier) and given to ``target``."""

    resource: Resource
    source: str
    target: str
    units: int
    reason: str


@dataclass(frozen=True)
class Shortfall:
    task: str
    resource: Resource
    wanted: int
    granted: int

    @property
    def missing(self) -> int:
        return self.wanted - self.granted


@dataclass
class AllocationResult:
    changes: list[Change] = field(default_factory=list)
    swaps: list[Swap] = field(default_factory=list)
    shortfalls: list[Shortfall] = field(default_factory=list)
    demands: dict[tuple[str, Resource], int] = field(default_factory=dict)


OverflowHook = Callable[[list[Shortfall]], None]


@dataclass
class AdmissionHold:
    """What an admitted task was granted, kept as its demand floor until it has real samples.

    An admitted task starts with no usage: its first ticks see a process still starting (or
    not yet in its cgroup), so forecast and observed demand read ~0, and the anti-thrash policy
    would take the admission grant away a few ticks later, before the task ever used it.  The
    grant stands until ``samples`` ticks have shown the task using the resource (usage > 0), or
    ``ticks`` ticks have passed, whichever comes first; then the usual policy applies.
    """

    grant: dict[Resource, int]
    samples: int
    ticks: int
    seen: int = 0
    age: int = 0


@dataclass(frozen=True)
class SwapRecord:
    """One line of the swap log: a change or a swap, when, and why."""

    time: float
    kind: str  # change | swap
    resource: Resource
    task: str
    old: int
    new: int
    reason: str
    source: str | None = None


class SwapManager:
    """Holds the tasks and moves the pool's units between them."""

    def __init__(self, pool: ResourcePool, headroom: float = 0.2, saturation: float = 0.9,
                 growth: float = 2.0, overflow_hook: OverflowHook | None = None,
                 policy=None, log_size: int = 1000):
        if headroom < 0:
            raise ConfigError("headroom", "must not be negative")
        self.pool = pool
        self.headroom = headroom
        self.saturation = saturation
        self.growth = growth
        self.overflow_hook = overflow_hook
        self.tasks: dict[str, ManagedTask] = {}
        #: optional anti-thrashing policy (swap.policy.StabilityPolicy): adjusts demands only,
        #: so tiers, minimums and fairness still hold whatever it decides
        self.policy = policy
        #: the last ``log_size`` changes and swaps, each with its reason (status, tests)
        self.swap_log: deque[SwapRecord] = deque(maxlen=log_size)
        #: admitted tasks whose grant stands until they have real samples (hold_admission)
        self.admission_holds: dict[str, AdmissionHold] = {}
        #: (task, resource) whose censoring is judged by use against the allocation (no flag
        #: from the kernel): ``demand`` keeps their expected use under the saturation line
        self._judged: set[tuple[str, Resource]] = set()
        self._task_columns: columns.TaskColumns | None = None

    # -- tasks -------------------------------------------------------------------------
    def add_task(self, task: ManagedTask) -> None:
        for r, lim in task.limits.items():
            if lim.max_units is not None and lim.max_units < lim.min_units:
                raise ConfigError(f"task {task.name}.{r.key}",
                                  f"max {lim.max_units} is below min {lim.min_units}")
        self.tasks[task.name] = task

    def remove_task(self, name: str) -> list[Change]:
        changes = self.deallocate_resources(name)
        self.tasks.pop(name, None)
        self.admission_holds.pop(name, None)
        self._judged = {k for k in self._judged if k[0] != name}
        if self.policy is not None:
            self.policy.forget(name)
        self._record(AllocationResult(changes=changes))
        return changes

    def hold_admission(self, name: str, grant: Mapping[Resource, int], samples: int = 3,
                       ticks: int = 20) -> None:
        """Keep ``name``'s admission ``grant`` as its demand floor until it has shown ``samples``
        ticks of real usage (or ``ticks`` ticks passed): see :class:`AdmissionHold`."""
        self._task(name)
        kept = {r: int(u) for r, u in grant.items() if u > 0}
        if kept and (samples > 0 or ticks > 0):
            self.admission_holds[name] = AdmissionHold(kept, samples, ticks)
        else:
            self.admission_holds.pop(name, None)

    def _age_admission_holds(self, usage: Mapping[str, Mapping[Resource, float]]) -> None:
        """Count this tick toward each hold's end: one tick older, one sample more if it used
        any held resource."""
        for name, hold in list(self.admission_holds.items()):
            if name not in self.tasks:
                del self.admission_holds[name]
                continue
            hold.age += 1
            if any((usage.get(name, {}).get(r) or 0.0) > 0 for r in hold.grant):
                hold.seen += 1
            if hold.seen >= hold.samples or hold.age >= hold.ticks:
                del self.admission_holds[name]
                log.info("%s: admission grant released to the policy after %d tick(s), "
                         "%d with usage", name, hold.age, hold.seen)

    # -- the seed's API ----------------------------------------------------------------
    def find_available_swap(self, task: str, resource: Resource,
                            units: int) -> list[tuple[str | None, int]]:
        """Where ``units`` could come from: the free pool (``None``), then lower tiers' excess.

        Lower-tier tasks are tapped lowest tier first, and never below their minimum.  The list
        may add up to less than ``units`` when the pool cannot cover it.
        """
        units = check_units(units)
        me = self._task(task)
        sources: list[tuple[str | None, int]] = []
        need = units
        free = self.pool.available(resource)
        if free and need:
            take = min(free, need)
            sources.append((None, take))
            need -= take
        donors = sorted((t for t in self.tasks.values() if t.priority > me.priority),
                        key=lambda t: (-t.priority, t.name))
        for donor in donors:
            if not need:
                break
            spare = self.pool.allocation(resource, donor.name) - donor.limit(resource).min_units
            if spare > 0:
                take = min(spare, need)
                sources.append((donor.name, take))
                need -= take
        return sources

    def swap_resources(self, task: str, resource: Resource, units: int,
                       source_task: str | None = None) -> list[Change]:
        """Give ``task`` ``units`` more, from the free pool or from ``source_task``.

        A source of a higher tier than ``task`` is refused, and so is taking a source below its
        minimum; nothing changes then.
        """
        units = check_units(units)
        me = self._task(task)
        new_total = self.pool.allocation(resource, task) + units
        lim = me.limit(resource)
        if lim.max_units is not None and new_total > lim.max_units:
            raise ResourceError(f"{task}: {new_total} {resource.unit} of {resource.key} "
                                f"would exceed its max {lim.max_units}")
        old_me = self.pool.allocation(resource, task)
        if source_task is None:
            self.pool.set_allocation(resource, task, new_total)
            return [Change(task, resource, old_me, new_total, "swap")]
        src = self._task(source_task)
        if src.priority < me.priority:
            raise ResourceError(f"{source_task} ({src.priority.name.lower()}) is a higher tier "
                                f"than {task} ({me.priority.name.lower()}); not taking from it")
        old_src = self.pool.allocation(resource, source_task)
        if old_src - units < src.limit(resource).min_units:
            raise ResourceError(f"{source_task} holds {old_src} {resource.unit}; giving {units} "
                                f"would take it below its minimum {src.limit(resource).min_units}")
        self.pool.transfer(resource, source_task, task, units)
        return [Change(source_task, resource, old_src, old_src - units, "swap"),
                Change(task, resource, old_me, new_total, "swap")]

    def deallocate_resources(self, task: str, resource: Resource | None = None) -> list[Change]:
        changes = []
        for r in [resource] if resource else self.pool.types():
            old = self.pool.allocation(r, task)
            if old:
                self.pool.set_allocation(r, task, 0)
                changes.append(Change(task, r, old, 0, "release"))
        return changes

    def observed_demand(self, task: str, resource: Resource, used: float,
                        censored: bool | None = None, withheld: float | None = None) -> float:
        """What the task would have used had it not been capped: the sample to learn from.

        A task held at its allocation cannot show more use than that (its demand is censored).
        ``censored`` comes from the kernel when the driver knows (CPU: the quota throttled it this
        tick); otherwise a task using ``saturation`` of what it holds counts as censored.  Where
        the kernel also says how much the cap held back (``withheld``, CPU: the time its threads
        waited throttled), a censored task's demand is use + that.  Otherwise it is taken as
        ``growth`` times its allocation, so the forecaster and the next allocation see it climb
        until the cap no longer binds.  Either way at most the pool and the task's limit.
        """
        held = self.pool.allocation(resource, task) if resource in self.pool else 0
        if censored is None:
            self._judged.add((task, resource))
            censored = held > 0 and used >= self.saturation * held
        else:
            self._judged.discard((task, resource))
        if not censored:
            return used
        limit = self.tasks[task].limit(resource).max_units if task in self.tasks else None
        if withheld is not None and math.isfinite(withheld) and withheld >= 0:
            want = min(used + withheld, self.pool.total(resource))
        else:
            # From a hold of 0 (the kernel's floor let it use a little) grow from what it used.
            want = min(max(held, used, 1) * self.growth, self.pool.total(resource))
        return max(used, min(want, limit) if limit is not None else want)

    def observed_demands(self, resource: Resource, used: Mapping[str, float],
                         censored: Mapping[str, bool] | None = None,
                         withheld: Mapping[str, float] | None = None) -> dict[str, float]:
        """:meth:`observed_demand` of every task in ``used`` (task -> units), with the kernel's
        ``censored``/``withheld`` per task where the driver has them."""
        if type(self).observed_demand is not _OWN["observed_demand"]:
            return {n: self.observed_demand(n, resource, u, (censored or {}).get(n),
                                            (withheld or {}).get(n)) for n, u in used.items()}
        held = self.pool.allocations(resource) if resource in self.pool else {}
        if not censored and used:
            out = columns.observed(self, resource, used, held)
            if out is not None:
                return out
        sat, judged, out = self.saturation, self._judged, {}
        for name, units in used.items():
            flag = censored.get(name) if censored else None
            if flag is None:
                judged.add((name, resource))
                h = held.get(name, 0)
                if not (h > 0 and units >= sat * h):
                    out[name] = units
                    continue
            elif not flag:
                judged.discard((name, resource))
                out[name] = units
                continue
            out[name] = self.observed_demand(name, resource, units, flag,
                                             withheld.get(name) if withheld else None)
        return out

    def demand(self, task: str, resource: Resource, forecast: float,
               observed: float | None = None) -> int:
        """Forecast plus headroom, at least the observed demand, clamped to the task's limits.

        Where no kernel flag says whether the cap held a task (``observed_demand`` judged it by
        use), the task is asked more than ``want / saturation`` whatever the headroom: a task
        held at what it was forecast to use, using it, reads as held back (use at the
        saturation line) and is grown, so an exact forecast would double a steady task's
        allocation every other tick.
        """
        t = self._task(task)
        # A diverged forecast (inf, nan) asks for the whole pool, never raises in the tick; a
        # finite demand above the pool stays as it is, so the shortfall reaches the overflow hook.
        if math.isfinite(forecast) and math.isfinite(observed or 0.0):
            want = max(0.0, forecast, observed or 0.0)
        else:
            want = float(self.pool.total(resource))
        ask = want * (1.0 + self.headroom)
        if (task, resource) in self._judged and 0.0 < self.saturation <= 1.0 and want > 0:
            ask = max(ask, math.floor(want / self.saturation) + 1.0)
        return t.limit(resource).clamp(math.ceil(ask))

    def proactive_allocation(self, forecasts: Mapping[str, Mapping[Resource, float]],
                             observed: Mapping[str, Mapping[Resource, float]] | None = None,
                             releases: Mapping[str, Mapping[Resource, float | None]] | None = None
                             ) -> AllocationResult:
        """Allocate every resource from the forecasts; return the changes in the order to apply.

        ``observed`` is this tick's demand per task (``observed_demand``): an allocation never
        drops below what a task was just seen to need, whatever the forecast says -- except to
        the task's ``releases`` value where its profile gives one (``TaskProfiler.releases``:
        the burst has ended at this phase of its period in each of the last periods).
        """
        usage = observed or {}
        rel = releases or {}
        result = AllocationResult()
        cols = self._columns()
        types = self.pool.types()
        if cols is not None:
            fc_cols, seen_cols = cols.transpose(forecasts, types), cols.transpose(usage, types)
        for r in types:
            if cols is not None and columns.allocate(self, r, cols, fc_cols[r], seen_cols[r],
                                                     rel, result):
                continue
            demands: dict[str, int] = {}
            for name in self.tasks:
                f = forecasts.get(name, {}).get(r)
                if f is None and r not in self.tasks[name].limits:
                    continue
                seen = usage.get(name, {}).get(r)
                low = rel.get(name, {}).get(r)
                if seen is not None and low is not None and math.isfinite(low):
                    seen = min(seen, max(0.0, low))
                demands[name] = self.demand(name, r, f or 0.0, seen)
                hold = self.admission_holds.get(name)
                if hold is not None and r in hold.grant:
                    demands[name] = self.tasks[name].limit(r).clamp(max(demands[name],
                                                                        hold.grant[r]))
            shared = demands
            if self.policy is not None:
                held = self.pool.allocations(r)
                shared = self.policy.adjust(r, self.pool.total(r), demands,
                                            {n: held.get(n, 0) for n in demands})
            targets = self._share(r, shared)
            self._apply_targets(r, demands, targets, result)
        self._age_admission_holds(usage)
        if result.shortfalls and self.overflow_hook:
            try:
                self.overflow_hook(result.shortfalls)
            except Exception as err:  # the hook is the operator's; never stop the tick for it
                log.warning("overflow hook failed: %s", err)
        self.pool.check()
        self._record(result)
        return result

    #: from this many tasks on, a resource is allocated over numpy columns (swap/columns.py:
    #: the same answer); below it the per-task loop is quicker
    COLUMNS_FROM = 64

    def _columns(self):
        """The tasks as ``columns.TaskColumns``, or None where the loop must run: few tasks,
        a policy other than StabilityPolicy, or a subclass that changes how demands, shares or
        changes are made."""
        if len(self.tasks) < self.COLUMNS_FROM:
            return None
        if self.policy is not None and type(self.policy) is not StabilityPolicy:
            return None
        cls = type(self)
        if any(getattr(cls, m) is not _OWN[m] for m in ("demand", "_share", "_apply_targets")):
            return None
        names, tasks = list(self.tasks), list(self.tasks.values())
        cols = self._task_columns
        if cols is None or not cols.same(names, tasks):
            cols = self._task_columns = columns.TaskColumns(names, tasks)
        return cols

    def _record(self, result: AllocationResult) -> None:
        now = time.time()
        changes, swaps = result.changes, result.swaps
        keep = self.swap_log.maxlen
        if keep is not None:  # only the last ``keep`` records stay: make no more than those
            n_sw = min(len(swaps), keep)
            n_ch = min(len(changes), keep - n_sw)
            kept_ch, kept_sw = changes[len(changes) - n_ch:], swaps[len(swaps) - n_sw:]
        else:
            kept_ch, kept_sw = changes, swaps
        self.swap_log.extend([SwapRecord(now, "change", ch.resource, ch.task, ch.old, ch.new,
                                         ch.reason) for ch in kept_ch])
        self.swap_log.extend([SwapRecord(now, "swap", sw.resource, sw.target, 0, sw.units,
                                         sw.reason, sw.source) for sw in kept_sw])
        if not log.isEnabledFor(logging.INFO):
            return
        for ch in changes:
            log.info("%s %s %d->%d (%s)", ch.task, ch.resource.key, ch.old, ch.new, ch.reason)
        for sw in swaps:
            log.info("%s took %d %s from %s (%s)", sw.target, sw.units, sw.resource.key,
                     sw.source, sw.reason)

    # -- internals ---------------------------------------------------------------------
    def _share(self, r: Resource, demands: dict[str, int]) -> dict[str, int]:
        total = self.pool.total(r)
        # Guaranteed minimums first (tier order if even they do not fit).
        grant: dict[str, int] = {}
        left = total
        for name in sorted(demands, key=lambda n: (self.tasks[n].priority, n)):
            m = min(self.tasks[name].limit(r).min_units, left)
            grant[name] = m
            left -= m
        for tier in Priority:
            members = [n for n in demands if self.tasks[n].priority == tier]
            extra = {n: demands[n] - grant[n] for n in members if demands[n] > grant[n]}
            if not extra:
                continue
            if sum(extra.values()) <= left:
                for n, e in extra.items():
                    grant[n] += e
                left -= sum(extra.values())
                continue
            # Max-min fair water-filling inside the tier.
            pending = dict(extra)
            while pending and left > 0:
                share = left // len(pending)
                if share == 0:
                    for n in sorted(pending)[:left]:
                        grant[n] += 1
                    left = 0
                    break
                for n in sorted(pending, key=lambda n: pending[n]):
                    give = min(share, pending[n])
                    grant[n] += give
                    left -= give
                    pending[n] -= give
                    if pending[n] == 0:
                        del pending[n]
            # This tier took everything that was left: lower tiers keep their minimums only.
            break
        return grant

    def _apply_targets(self, r: Resource, demands: dict[str, int], targets: dict[str, int],
                       result: AllocationResult) -> None:
        held = self.pool.allocations(r)
        current = {n: held.get(n, 0) for n in targets}
        down = [n for n in targets if targets[n] < current[n]]
        up = [n for n in targets if targets[n] > current[n]]
        for n in demands:
            result.demands[(n, r)] = demands[n]
            if targets[n] < demands[n]:
                result.shortfalls.append(Shortfall(n, r, demands[n], targets[n]))
        freed: list[list] = []
        for n in down:
            reason = "priority" if targets[n] < demands[n] else "reclaim"
            self.pool.set_allocation(r, n, targets[n])
            result.changes.append(Change(n, r, current[n], targets[n], reason))
            if reason == "priority":
                freed.append([n, current[n] - targets[n]])
        free_before = self.pool.available(r) - sum(u for _, u in freed)
        first = 0  # freed[:first] is given away: skipped, so the scan is not O(up x freed)
        for n in sorted(up, key=lambda n: (self.tasks[n].priority, n)):
            need = targets[n] - current[n]
            from_free = min(max(free_before, 0), need)
            free_before -= from_free
            need -= from_free
            while first < len(freed) and freed[first][1] == 0:
                first += 1
            for i in range(first, len(freed)):
                if not need:
                    break
                item = freed[i]
                take = min(item[1], need)
                if take and self.tasks[item[0]].priority > self.tasks[n].priority:
                    result.swaps.append(Swap(r, item[0], n, take, "priority"))
                    item[1] -= take
                    need -= take
            # n is set once per tick and only here: what it holds is still current[n]
            self.pool.set_allocation(r, n, targets[n])
            result.changes.append(Change(n, r, current[n], targets[n], "forecast"))

    def _task(self, name: str) -> ManagedTask:
        try:
            return self.tasks[name]
        except KeyError:
            raise ResourceError(f"no task named {name!r}; add it first") from None


#: the manager's own methods, as defined here: a subclass (or a test's stand-in) that replaces
#: one of them gets the per-task loop that calls it
_OWN = {m: SwapManager.__dict__[m]
        for m in ("observed_demand", "demand", "_share", "_apply_targets")}
