"""The contract every shipped driver keeps (as River checks every estimator): it is a
ResourceDriver for the resource its factory is registered under, it implements what that
promises (total, measure, plan, apply), and every optional capability it has is declared by type
(host.driver's protocols), since the runtime asks ``isinstance``, never ``hasattr``."""
from __future__ import annotations

import importlib
import inspect

import pytest

from rswap_ebpf.host import driver as proto
from rswap_ebpf.host.registry import FACTORIES

#: capability -> the members that make a driver have it
CAPABILITIES = {
    proto.Admits: ("fit", "place", "release"),
    proto.ShapesByTier: ("set_priority", "set_limit"),
    proto.KeepsFloors: ("set_floor",),
    proto.Settles: ("settle",),
    proto.ReportsRunqueue: ("runq_report",),
}


def _driver_classes():
    seen = []
    for rtype, spec in FACTORIES.items():
        module = importlib.import_module(f"rswap_ebpf.host.{spec.split(':')[0]}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, proto.ResourceDriver) and cls is not proto.ResourceDriver \
                    and cls.__module__ == module.__name__:
                seen.append(pytest.param(rtype, cls, id=cls.__name__))
    return seen


DRIVERS = _driver_classes()


def test_every_registered_family_has_a_driver():
    assert {p.values[0] for p in DRIVERS} == set(FACTORIES)


@pytest.mark.parametrize("rtype, cls", DRIVERS)
def test_a_driver_serves_the_resource_it_is_registered_for(rtype, cls):
    assert cls.resource == rtype


@pytest.mark.parametrize("rtype, cls", DRIVERS)
def test_a_driver_implements_what_a_resource_driver_promises(rtype, cls):
    for name in ("total", "measure", "plan", "apply"):
        impl = getattr(cls, name)
        base = getattr(proto.ResourceDriver, name)
        assert impl is not base, f"{cls.__name__}.{name} is the base's NotImplementedError"


@pytest.mark.parametrize("rtype, cls", DRIVERS)
def test_every_capability_a_driver_has_is_declared_by_type(rtype, cls):
    for capability, members in CAPABILITIES.items():
        has = [m for m in members if getattr(cls, m, None) is not getattr(capability, m, None)
               and any(m in vars(k) for k in cls.__mro__ if k not in (capability, object))]
        if has:
            assert issubclass(cls, capability), \
                f"{cls.__name__} has {has} but does not declare {capability.__name__}"
            missing = [m for m in members if getattr(cls, m) is getattr(capability, m)]
            assert not missing, f"{cls.__name__} declares {capability.__name__} without {missing}"
    if issubclass(cls, proto.ReportsDrops):
        assert "last_dropped" in inspect.getsource(cls), \
            f"{cls.__name__} declares ReportsDrops but never sets last_dropped"
