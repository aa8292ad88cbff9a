"""SpecializedCoproc: a co-processor the operator registers with probe/apply commands
(protocol in :mod:`rswap_ebpf.host.coproc.device`).  One driver per co-processor: the unnamed one
(``[resources.coproc]``) or each named one (``[resources.coproc.<name>]``)."""
from __future__ import annotations

import logging
from collections.abc import Mapping

from rswap_ebpf.host.coproc.device import Coproc, CoprocSpec, ProbeError
from rswap_ebpf.host.cgroup import TaskCgroup, Write
from rswap_ebpf.errors import ConfigError
from rswap_ebpf.model.resources import Resource, ResourceType
from rswap_ebpf.host.driver import DriverContext, ResourceDriver

log = logging.getLogger(__name__)


class CoprocDriver(ResourceDriver):
    resource: Resource = ResourceType.SPECIALIZED_COPROC

    def __init__(self, coproc: Coproc, resource: Resource = ResourceType.SPECIALIZED_COPROC):
        self.coproc = coproc
        self.resource = resource
        self.last_error: ProbeError | None = None

    def total(self) -> int:
        return self.coproc.spec.total_units

    def open(self) -> None:
        """Run the probe once with no tasks, so a broken probe stops the start, clearly."""
        self.coproc.probe({})

    def measure(self, tasks: Mapping[str, TaskCgroup]) -> dict[str, float]:
        """Units per task; {} (no sample, not zeros) when the probe failed this tick."""
        try:
            used = self.coproc.probe({n: cg.pids() for n, cg in tasks.items()})
        except ProbeError as err:
            if str(err) != str(self.last_error):
                log.warning("%s", err)
            self.last_error = err
            return {}
        self.last_error = None
        return used

    def censored(self, tasks: Mapping[str, TaskCgroup]) -> dict[str, bool]:
        """Without an apply command nothing holds a task to its allocation, so what the probe
        reports is its whole demand, even when it equals the allocation (which would otherwise
        read as capped and double the allocation each tick)."""
        if self.coproc.spec.apply:
            return {}
        return {name: False for name in tasks}

    def plan(self, cg: TaskCgroup, units: int) -> list[Write]:
        if not self.coproc.spec.apply:
            return []
        return [(" ".join(self.coproc.spec.apply), f"{cg.name} {units}")]

    def apply(self, cg: TaskCgroup, units: int) -> list[Write]:
        self.coproc.apply(cg.name, units, cg.pids())
        return self.plan(cg, units)


def make(ctx: DriverContext, resource: Resource = ResourceType.SPECIALIZED_COPROC) -> CoprocDriver:
    opts = getattr(ctx.config, "options", {}).get(resource)
    total = getattr(ctx.config, "totals", {}).get(resource)
    if not opts or "probe" not in opts or total is None:
        where = "resources.coproc" + (f".{resource.instance}" if resource.instance else "")
        raise ConfigError(where, "register the co-processor with total, probe "
                          "(and optionally apply, timeout)")
    return CoprocDriver(Coproc(CoprocSpec.from_options(opts, total)), resource)
