"""SpecializedCoproc: a co-processor the operator registers with probe/apply commands
(protocol in :mod:`rswap_ebpf.coproc`)."""
from __future__ import annotations

import logging
from collections.abc import Mapping

from ..coproc import Coproc, CoprocSpec, ProbeError
from ..enforce.cgroup import TaskCgroup, Write
from ..errors import ConfigError
from ..resources import ResourceType
from .base import DriverContext, ResourceDriver

log = logging.getLogger(__name__)


class CoprocDriver(ResourceDriver):
    resource = ResourceType.SPECIALIZED_COPROC

    def __init__(self, coproc: Coproc):
        self.coproc = coproc
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

    def plan(self, cg: TaskCgroup, units: int) -> list[Write]:
        if not self.coproc.spec.apply:
            return []
        return [(" ".join(self.coproc.spec.apply), f"{cg.name} {units}")]

    def apply(self, cg: TaskCgroup, units: int) -> list[Write]:
        self.coproc.apply(cg.name, units, cg.pids())
        return self.plan(cg, units)


def make(ctx: DriverContext) -> CoprocDriver:
    r = ResourceType.SPECIALIZED_COPROC
    opts = getattr(ctx.config, "options", {}).get(r)
    total = getattr(ctx.config, "totals", {}).get(r)
    if not opts or "probe" not in opts or total is None:
        raise ConfigError("resources.coproc", "register the co-processor with total, probe "
                          "(and optionally name, apply, timeout)")
    return CoprocDriver(Coproc(CoprocSpec.from_options(opts, total)))
