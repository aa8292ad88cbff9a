"""Resource drivers, one module per resource family, each exposing ``make(ctx)``.

To add a resource: write ``drivers/<name>.py`` with a :class:`ResourceDriver` subclass and a
``make(ctx: DriverContext)`` factory, and add it to ``FACTORIES``.  The daemon builds only the
drivers whose resource the configuration uses (CPU when it names none).  A type a host may have
several of (``resources.MULTI_INSTANCE``: co-processors) gets one driver per named instance, from
``make(ctx, resource)``.
"""
from __future__ import annotations

import importlib

from rswap_ebpf.model.resources import Resource, ResourceId, ResourceType
from rswap_ebpf.host.driver import DriverContext, FeatureCheck, ResourceDriver

__all__ = ["DriverContext", "FeatureCheck", "ResourceDriver", "FACTORIES", "build"]

#: resource -> "module:function" building its driver.
FACTORIES: dict[ResourceType, str] = {
    ResourceType.PROCESSOR_CYCLES: "cpu.driver:make",
    ResourceType.CACHE: "cache.driver:make",
    ResourceType.MEMORY_BANDWIDTH: "cache.membw:make",
    ResourceType.GPU_MEMORY: "gpu.driver:make",
    ResourceType.SPECIALIZED_COPROC: "coproc.driver:make",
    ResourceType.STORAGE_IOPS: "io.driver:make",
    ResourceType.NETWORK_BANDWIDTH: "net.driver:make",
}

#: resource -> the ``bpf/*.bpf.c`` its driver loads (each includes ``rswap.h``); the cache
#: driver loads ``pmu.bpf.c`` only where the host has a PMU.  ``rswap run --ebpf`` prints these.
BPF_PROGRAMS: dict[ResourceType, tuple[str, ...]] = {
    ResourceType.PROCESSOR_CYCLES: ("cpu.bpf.c", "runq.bpf.c"),
    ResourceType.CACHE: ("pmu.bpf.c",),
    ResourceType.STORAGE_IOPS: ("block.bpf.c",),
    ResourceType.NETWORK_BANDWIDTH: ("net.bpf.c",),
}


def bpf_programs(resources) -> list[str]:
    """The BPF programs the drivers of ``resources`` load, in a stable order, each once (CPU's
    when ``resources`` is empty: the daemon then runs the CPU driver alone)."""
    types = {r.type for r in resources} or {ResourceType.PROCESSOR_CYCLES}
    return [p for t in ResourceType if t in types for p in BPF_PROGRAMS.get(t, ())]


#: resources whose hardware many hosts lack (no RDT, no PMU, no GPU): when their driver raises
#: FeatureMissing the daemon reports them as missing and runs the others.
MAY_BE_ABSENT: frozenset[ResourceType] = frozenset({
    ResourceType.CACHE, ResourceType.MEMORY_BANDWIDTH, ResourceType.GPU_MEMORY})


def build(resource: Resource, ctx: DriverContext) -> ResourceDriver:
    from rswap_ebpf.errors import FeatureMissing

    spec = FACTORIES.get(resource.type)
    if spec is None:
        raise FeatureMissing(f"{resource.key} driver", "rswap has no driver for this resource yet")
    module, func = spec.split(":")
    make = getattr(importlib.import_module(f"rswap_ebpf.host.{module}"), func)
    return make(ctx, resource) if isinstance(resource, ResourceId) else make(ctx)
