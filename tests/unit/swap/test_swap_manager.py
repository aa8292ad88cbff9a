"""The swap manager: tiers, minimums, headroom, swaps and the seed's API."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rswap_ebpf.errors import ResourceError
from rswap_ebpf.model.resources import ResourcePool, ResourceType
from rswap_ebpf.model.limits import Limits, Priority
from rswap_ebpf.swap.manager import ManagedTask, SwapManager

CPU = ResourceType.PROCESSOR_CYCLES


def make(total=2000, headroom=0.0, **kw):
    pool = ResourcePool()
    pool.register_resource(CPU, total)
    return SwapManager(pool, headroom=headroom, **kw)


def add(m, name, prio, lo=0, hi=None):
    m.add_task(ManagedTask(name, Priority.parse(prio), {CPU: Limits(lo, hi)}))


def test_critical_is_served_first_and_batch_gets_the_rest():
    m = make()
    add(m, "web", "critical")
    add(m, "batch", "batch", lo=100)
    res = m.proactive_allocation({"web": {CPU: 1500}, "batch": {CPU: 2000}})
    assert m.pool.allocation(CPU, "web") == 1500
    assert m.pool.allocation(CPU, "batch") == 500
    assert [s.task for s in res.shortfalls] == ["batch"]


def test_headroom_is_added_and_max_respected():
    m = make(headroom=0.2)
    add(m, "a", "normal", hi=1100)
    add(m, "b", "normal")
    m.proactive_allocation({"a": {CPU: 1000}, "b": {CPU: 500}})
    assert m.pool.allocation(CPU, "a") == 1100
    assert m.pool.allocation(CPU, "b") == 600


def test_minimum_is_a_guarantee_even_for_batch():
    m = make()
    add(m, "web", "critical")
    add(m, "batch", "batch", lo=300)
    m.proactive_allocation({"web": {CPU: 5000}, "batch": {CPU: 1000}})
    assert m.pool.allocation(CPU, "batch") == 300
    assert m.pool.allocation(CPU, "web") == 1700


def test_short_pool_is_shared_max_min_fairly_within_a_tier():
    m = make(total=1000)
    for n, want in (("a", 100), ("b", 800), ("c", 800)):
        add(m, n, "normal")
    m.proactive_allocation({"a": {CPU: 100}, "b": {CPU: 800}, "c": {CPU: 800}})
    assert m.pool.allocation(CPU, "a") == 100
    assert m.pool.allocation(CPU, "b") == m.pool.allocation(CPU, "c") == 450


def test_rising_forecast_takes_units_from_batch_as_a_swap():
    m = make()
    add(m, "web", "critical")
    add(m, "batch", "batch")
    m.proactive_allocation({"web": {CPU: 200}, "batch": {CPU: 1800}})
    res = m.proactive_allocation({"web": {CPU: 1200}, "batch": {CPU: 1800}})
    assert m.pool.allocation(CPU, "web") == 1200
    assert m.pool.allocation(CPU, "batch") == 800
    assert [(s.source, s.target, s.units) for s in res.swaps] == [("batch", "web", 1000)]
    reasons = {c.task: c.reason for c in res.changes}
    assert reasons == {"batch": "priority", "web": "forecast"}


def test_unused_units_are_reclaimed():
    m = make()
    add(m, "a", "normal")
    m.proactive_allocation({"a": {CPU: 1500}})
    res = m.proactive_allocation({"a": {CPU: 100}})
    assert m.pool.allocation(CPU, "a") == 100
    assert res.changes[0].reason == "reclaim"
    assert m.pool.available(CPU) == 1900


def test_saturated_task_is_offered_more_than_it_could_show():
    m = make(growth=2.0)
    add(m, "a", "normal")
    m.proactive_allocation({"a": {CPU: 300}})
    assert m.observed_demand("a", CPU, 295) == 600
    assert m.observed_demand("a", CPU, 100) == 100
    # The kernel's word (throttled or not) overrides the usage ratio.
    assert m.observed_demand("a", CPU, 100, censored=True) == 600
    assert m.observed_demand("a", CPU, 295, censored=False) == 295
    assert m.observed_demand("a", CPU, 295, censored=True) <= m.pool.total(CPU)
    # A task held at 0 that the kernel says was throttled can still grow.
    assert m.observed_demand("b", CPU, 10, censored=True) == 20


def test_swap_resources_never_takes_from_a_higher_tier():
    m = make()
    add(m, "web", "critical")
    add(m, "batch", "batch")
    m.swap_resources("web", CPU, 1000)
    with pytest.raises(ResourceError, match="higher tier"):
        m.swap_resources("batch", CPU, 500, source_task="web")
    assert m.pool.allocation(CPU, "web") == 1000
    m.swap_resources("batch", CPU, 1000)
    changes = m.swap_resources("web", CPU, 400, source_task="batch")
    assert [c.new for c in changes] == [600, 1400]


def test_swap_refuses_to_take_a_source_below_its_minimum():
    m = make()
    add(m, "web", "critical")
    add(m, "batch", "batch", lo=500)
    m.swap_resources("batch", CPU, 600)
    with pytest.raises(ResourceError, match="minimum"):
        m.swap_resources("web", CPU, 200, source_task="batch")


def test_find_available_swap_lists_free_pool_then_lowest_tier():
    m = make()
    add(m, "web", "critical")
    add(m, "svc", "normal")
    add(m, "batch", "batch", lo=100)
    m.swap_resources("svc", CPU, 800)
    m.swap_resources("batch", CPU, 1000)
    assert m.find_available_swap("web", CPU, 1500) == [(None, 200), ("batch", 900), ("svc", 400)]


def test_overflow_hook_hears_shortfalls():
    heard = []
    m = make(overflow_hook=heard.extend)
    add(m, "a", "critical")
    m.proactive_allocation({"a": {CPU: 3000}})
    assert heard and heard[0].missing == 1000


def test_deallocate_returns_units_to_the_pool():
    m = make()
    add(m, "a", "normal")
    m.swap_resources("a", CPU, 700)
    assert [c.new for c in m.deallocate_resources("a")] == [0]
    assert m.pool.available(CPU) == 2000


@settings(max_examples=200, deadline=None)
@given(total=st.integers(100, 8000),
       tasks=st.lists(st.tuples(st.sampled_from(list(Priority)), st.integers(0, 500),
                                st.integers(0, 6000)), min_size=1, max_size=8),
       rounds=st.integers(1, 3))
def test_no_higher_tier_shortfall_while_lower_tier_holds_more_than_its_minimum(total, tasks, rounds):
    m = make(total=total)
    forecasts = {}
    for i, (prio, lo, want) in enumerate(tasks):
        m.add_task(ManagedTask(f"t{i}", prio, {CPU: Limits(lo, None)}))
        forecasts[f"t{i}"] = {CPU: want}
    for _ in range(rounds):
        res = m.proactive_allocation(forecasts)
        m.pool.check()
    short_tiers = {m.tasks[s.task].priority for s in res.shortfalls}
    for name, t in m.tasks.items():
        held = m.pool.allocation(CPU, name)
        if held > t.limit(CPU).min_units:
            assert not any(p < t.priority for p in short_tiers), (name, held, res.shortfalls)


def test_a_diverging_forecast_costs_at_most_the_pool_never_an_exception():
    m = make()
    add(m, "a", "critical")
    add(m, "b", "batch", lo=100)
    res = m.proactive_allocation({"a": {CPU: float("inf")}, "b": {CPU: 2e27}})
    assert m.pool.allocation(CPU, "a") == 1900 and m.pool.allocation(CPU, "b") == 100
    assert m.demand("a", CPU, float("nan")) == 2000
    assert {s.task for s in res.shortfalls} == {"a", "b"}


# -- an admitted task keeps its grant until it has real samples --------------------------------
def _admitted(samples=3, ticks=20):
    from rswap_ebpf.swap.policy import StabilityPolicy

    m = make(total=1000, policy=StabilityPolicy(hold_ticks=2, deadband=0.1, max_step_down=0.25))
    add(m, "batch", "batch", lo=100)
    m.proactive_allocation({"batch": {CPU: 1000}}, {"batch": {CPU: 1000}})
    assert m.pool.allocation(CPU, "batch") == 1000
    add(m, "crit", "critical", hi=600)
    for src, take in m.find_available_swap("crit", CPU, 600):
        m.swap_resources("crit", CPU, take, src)
    m.hold_admission("crit", {CPU: 600}, samples=samples, ticks=ticks)
    return m


def _tick(m, crit_used):
    m.proactive_allocation({"crit": {CPU: crit_used}, "batch": {CPU: 1000}},
                           {"crit": {CPU: crit_used}, "batch": {CPU: 1000}})
    return m.pool.allocation(CPU, "crit")


def test_without_the_hold_a_starting_task_loses_its_grant_before_it_runs():
    """The race the hold closes: ticks that see a process still starting (usage 0)."""
    m = _admitted()
    m.admission_holds.clear()
    held = [_tick(m, 0.0) for _ in range(6)]
    assert held[:2] == [600, 600] and held[-1] < 600


def test_admitted_task_keeps_its_grant_while_it_shows_no_usage():
    m = _admitted(samples=3, ticks=20)
    assert [_tick(m, 0.0) for _ in range(10)] == [600] * 10
    assert "crit" in m.admission_holds
    assert m.pool.allocation(CPU, "batch") == 400  # batch cannot take it back meanwhile


def test_hold_ends_after_enough_real_samples_then_the_policy_lowers_it():
    m = _admitted(samples=3, ticks=20)
    held = [_tick(m, 0.0), _tick(m, 50.0), _tick(m, 50.0), _tick(m, 50.0)]
    assert held == [600] * 4 and "crit" not in m.admission_holds
    later = [_tick(m, 50.0) for _ in range(6)]
    assert later[:2] == [600, 600]  # the policy's own hold_ticks, as for any task
    assert later[-1] < 600


def test_hold_ends_after_its_tick_bound_even_for_an_idle_task():
    m = _admitted(samples=3, ticks=4)
    assert [_tick(m, 0.0) for _ in range(4)] == [600] * 4
    assert "crit" not in m.admission_holds
    assert [_tick(m, 0.0) for _ in range(6)][-1] < 600


def test_hold_is_dropped_with_the_task():
    m = _admitted()
    m.remove_task("crit")
    assert m.admission_holds == {}
    assert m.pool.allocation(CPU, "crit") == 0


IO = ResourceType.STORAGE_IOPS


def _steady(m, task, r, use, ticks, censored=None):
    """Tick by tick, as Daemon.tick does: observe (capped by what it holds), then allocate the
    exact forecast (the steady use itself); returns the allocations."""
    held = []
    for _ in range(ticks):
        alloc = m.pool.allocation(r, task)
        used = min(use, alloc) if alloc else use
        seen = m.observed_demand(task, r, used, censored)
        m.proactive_allocation({task: {r: float(use)}}, {task: {r: seen}})
        held.append(m.pool.allocation(r, task))
    return held


def test_an_exact_forecast_is_not_read_as_held_back_where_use_is_the_only_judge():
    """Where no kernel flag says whether a cap held a task, a task using 90% (saturation) of
    what it holds counts as held, and is grown.  An allocation of exactly the forecast use
    would then be read as held every other tick and doubled: a steady 80 IO/s was allocated
    160 half the time.  So the allocation asks more than use / saturation."""
    pool = ResourcePool()
    pool.register_resource(IO, 1000)
    pool.register_resource(CPU, 2000)
    m = SwapManager(pool, headroom=0.0)
    m.add_task(ManagedTask("scan", Priority.NORMAL, {IO: Limits(), CPU: Limits()}))
    held = _steady(m, "scan", IO, 80, 20)
    assert held[1:] == [89] * 19  # the least above 80 / 0.9
    # Where the kernel says (CPU: throttled or not), the forecast is allocated as it is.
    assert _steady(m, "scan", CPU, 800, 5, censored=False)[1:] == [800] * 4
    # A headroom above the margin is the policy's own, and stays as it was (reactive's 20%).
    m.headroom = 0.2
    assert _steady(m, "scan", IO, 80, 3)[-1] == 96


def test_without_the_margin_an_exact_forecast_doubles_every_other_tick():
    """What the margin prevents, shown on the same path with the judgement switched off."""
    pool = ResourcePool()
    pool.register_resource(IO, 1000)
    m = SwapManager(pool, headroom=0.0)
    m.add_task(ManagedTask("scan", Priority.NORMAL, {IO: Limits()}))
    m.saturation = 1.5  # out of (0, 1]: no margin (use never reaches 1.5x what it holds)
    assert _steady(m, "scan", IO, 80, 6)[1:] == [80] * 5
    m.saturation = 0.9
    m._judged.clear()
    original = SwapManager.demand

    def no_margin(self, task, resource, forecast, observed=None):
        self._judged.discard((task, resource))
        return original(self, task, resource, forecast, observed)
    m.demand = no_margin.__get__(m)
    assert 160 in _steady(m, "scan", IO, 80, 6)
