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


# -- the running total: every mutation path keeps it equal to the recomputed sum ---------------
GPU = ResourceType.GPU_MEMORY
pool_ops = st.lists(st.tuples(
    st.sampled_from(["set", "transfer", "release", "release_all", "resize", "monitor"]),
    st.sampled_from([CPU, GPU]), st.sampled_from(["a", "b", "c", "d"]),
    st.sampled_from(["a", "b", "c", "d"]), st.integers(min_value=-5, max_value=3000)),
    max_size=80)


def _assert_tally(pool):
    for r in pool.types():
        info = pool._info(r)
        assert info.allocated_units == sum(info.allocations.values())
        assert pool.available(r) == pool.total(r) - sum(info.allocations.values())
        assert pool.allocations(r) == dict(info.allocations)
    pool.check()


@settings(max_examples=300, deadline=None)
@given(ops=pool_ops)
def test_running_total_is_the_sum_after_any_pool_mutation(ops):
    pool = ResourcePool()
    pool.register_resource(CPU, 2000)
    pool.register_resource(GPU, 4000)
    monitored = {CPU: 2000, GPU: 4000}
    for r in (CPU, GPU):
        pool.monitor_resource(r, lambda r=r: monitored[r])
    for op, r, t1, t2, units in ops:
        try:
            if op == "set":
                pool.set_allocation(r, t1, units)
            elif op == "transfer":
                pool.transfer(r, t1, t2, units)
            elif op == "release":
                pool.release(t1, r)
            elif op == "release_all":
                pool.release(t1)
            elif op == "resize":
                pool.register_resource(r, units)
            else:
                monitored[r] = max(0, units)
                pool.monitor_resource(r)
        except (ResourceError, ConfigError):
            pass
        _assert_tally(pool)


dict_ops = st.lists(st.tuples(
    st.sampled_from(["set", "del", "pop", "pop_default", "popitem", "clear", "update",
                     "setdefault", "ior"]),
    st.sampled_from(["a", "b", "c"]), st.integers(min_value=0, max_value=100)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(start=st.dictionaries(st.sampled_from(["a", "b", "c"]), st.integers(0, 100)), ops=dict_ops)
def test_running_total_follows_every_dict_method(start, ops):
    """Code that holds the ResourceInfo (register_resource returns it) may change the dict
    directly: the total follows whatever it does."""
    import copy
    import pickle

    from rswap_ebpf.model.resources import Allocations, ResourceInfo

    info = ResourceInfo(CPU, 10**6, dict(start))
    assert isinstance(info.allocations, Allocations)
    a = info.allocations
    for op, task, units in ops:
        try:
            if op == "set":
                a[task] = units
            elif op == "del":
                del a[task]
            elif op == "pop":
                a.pop(task)
            elif op == "pop_default":
                expected = a.get(task, 7)
                assert a.pop(task, 7) == expected and task not in a
            elif op == "popitem":
                a.popitem()
            elif op == "clear":
                a.clear()
            elif op == "update":
                a.update({task: units}, z=units)
            elif op == "setdefault":
                a.setdefault(task, units)
            else:
                a |= {task: units}
        except KeyError:
            pass
        assert info.allocated_units == sum(a.values())
        for twin in (copy.copy(a), copy.deepcopy(a), pickle.loads(pickle.dumps(a))):
            assert twin == a and twin.allocated == a.allocated
    info.check()


def test_check_names_a_running_total_that_drifted():
    pool = ResourcePool()
    info = pool.register_resource(CPU, 1000)
    pool.set_allocation(CPU, "a", 300)
    dict.__setitem__(info.allocations, "a", 200)  # behind the tally's back
    with pytest.raises(ResourceError, match="running total"):
        pool.check()
