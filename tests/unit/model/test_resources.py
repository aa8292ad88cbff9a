"""Pool invariants: no allocation negative, the sum never above total, available = total - sum."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rswap_ebpf.errors import ConfigError, ResourceError
from rswap_ebpf.model.resources import ResourcePool, ResourceType, check_units

CPU = ResourceType.PROCESSOR_CYCLES


def test_every_type_states_its_unit():
    for r in ResourceType:
        assert r.unit and r.key
    assert CPU.unit == "millicores"


@pytest.mark.parametrize("text", ["cpu", "ProcessorCycles", "processor_cycles", "GPU_Memory", "io"])
def test_parse_accepts_seed_and_short_names(text):
    assert isinstance(ResourceType.parse(text), ResourceType)


def test_parse_unknown_names_the_field():
    with pytest.raises(ConfigError, match=r"^task\[0\]\.res: unknown resource 'bogus'"):
        ResourceType.parse("bogus", "task[0].res")


@pytest.mark.parametrize("bad", [-1, "-3", "abc", float("nan"), float("inf"), True, None, [1]])
def test_check_units_rejects(bad):
    with pytest.raises(ConfigError):
        check_units(bad, "x")


def test_over_allocation_is_refused_and_changes_nothing():
    pool = ResourcePool()
    pool.register_resource(CPU, 2000)
    pool.set_allocation(CPU, "a", 1500)
    with pytest.raises(ResourceError):
        pool.set_allocation(CPU, "b", 600)
    snap = pool.get_available_resources(CPU)
    assert snap.allocations == {"a": 1500} and snap.available_units == 500


def test_shrinking_total_below_allocated_is_refused():
    pool = ResourcePool()
    pool.register_resource(CPU, 2000)
    pool.set_allocation(CPU, "a", 1500)
    with pytest.raises(ResourceError, match="deallocate first"):
        pool.register_resource(CPU, 1000)
    assert pool.total(CPU) == 2000


def test_monitor_never_breaks_invariants():
    pool = ResourcePool()
    pool.register_resource(CPU, 4000)
    pool.set_allocation(CPU, "a", 3000)
    assert pool.monitor_resource(CPU, lambda: 2000) == 3000  # kept until the manager shrinks
    pool.check()
    pool.set_allocation(CPU, "a", 1000)
    assert pool.monitor_resource(CPU) == 2000


def test_unregistered_resource_says_what_to_do():
    with pytest.raises(ResourceError, match="register_resource"):
        ResourcePool().available(ResourceType.CACHE)


ops = st.lists(st.tuples(st.sampled_from(["set", "transfer", "release"]),
                         st.sampled_from(["a", "b", "c"]), st.sampled_from(["a", "b", "c"]),
                         st.integers(min_value=-50, max_value=3000)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(total=st.integers(min_value=0, max_value=4000), ops=ops)
def test_invariants_hold_under_any_sequence(total, ops):
    pool = ResourcePool()
    pool.register_resource(CPU, total)
    for op, t1, t2, units in ops:
        before = pool.get_available_resources(CPU)
        try:
            if op == "set":
                pool.set_allocation(CPU, t1, units)
            elif op == "transfer":
                pool.transfer(CPU, t1, t2, units)
            else:
                pool.release(t1)
        except (ResourceError, ConfigError):
            assert pool.get_available_resources(CPU) == before  # a refusal changes nothing
        snap = pool.get_available_resources(CPU)
        assert all(u > 0 for u in snap.allocations.values())
        assert sum(snap.allocations.values()) <= snap.total_units
        assert snap.available_units == snap.total_units - sum(snap.allocations.values())
