"""The tick length reaches every forecaster the daemon and replay make (``make_forecaster``'s
``tick_s``): the selection's buckets are seconds wide, a period in ticks is shown in seconds, and
a profile learnt at another tick length is not restored as if its ticks were ours."""
from __future__ import annotations

import pytest

from rswap_ebpf.errors import ConfigError
from rswap_ebpf.model.resources import ResourceType
from rswap_ebpf.predict.profile import TaskProfile, TaskProfiler
from rswap_ebpf.predict.registry import make_forecaster
from rswap_ebpf.predict.store import ProfileStore

CPU = ResourceType.PROCESSOR_CYCLES


@pytest.mark.parametrize("tick_s,first", [(1.0, 10), (0.5, 20), (2.0, 5)])
def test_the_selections_buckets_are_ten_seconds_at_any_tick(tick_s, first):
    f = make_forecaster("auto", scale=100, tick_s=tick_s)
    assert f.tick_s == tick_s
    assert f.rollups.widths[0] == first  # the 10-s level, in ticks


def test_a_table_spec_gets_the_tick_too_and_may_repeat_it():
    f = make_forecaster({"name": "auto", "loss": "mae", "tick_s": 0.5}, tick_s=0.5)
    assert f.tick_s == 0.5 and f.loss == "mae"


def test_a_spec_naming_another_tick_is_refused_with_what_to_do():
    with pytest.raises(ConfigError) as err:
        make_forecaster({"name": "auto", "tick_s": 1.0}, tick_s=0.5, field="task web.forecaster")
    assert err.value.field == "task web.forecaster.tick_s"
    assert "leave tick_s out" in str(err.value)


def test_forecasters_without_buckets_take_no_tick():
    f = make_forecaster({"name": "seasonal_naive", "period": 8}, tick_s=0.5)
    assert not hasattr(f, "tick_s")


def test_period_s_is_the_period_at_the_profilers_tick_for_every_forecaster():
    """A period the configuration gives (seasonal-naive's) is in ticks: 8 ticks of 0.5 s."""
    p = TaskProfiler(lambda t, r: make_forecaster({"name": "seasonal_naive", "period": 8},
                                                  tick_s=0.5), interval=0.5)
    for i in range(20):
        p.update_prediction("web", CPU, 100.0 if i % 8 == 0 else 5.0)
    d = p.profiles[("web", CPU)].describe()
    assert (d["period"], d["period_s"], d["period_source"]) == (8, 4.0, "given")


def test_period_s_of_a_found_season_follows_the_tick():
    p = TaskProfiler(lambda t, r: make_forecaster({"name": "auto", "loss": "mae",
                                                   "max_period": 20}, tick_s=0.25),
                     interval=0.25)
    for i in range(200):
        p.update_prediction("cron", CPU, 50.0 if i % 6 == 0 else 1.0)
    d = p.profiles[("cron", CPU)].describe()
    assert d["period"] == 6 and d["period_s"] == 1.5 and d["period_source"] == "ticks"
    assert 0 < d["period_confidence"] <= 1


def _learn(store, interval, n=130):
    p = TaskProfiler(lambda t, r: make_forecaster("auto", scale=2000, tick_s=interval),
                     store=store, interval=interval, checkpoint_every=25)
    for i in range(n):
        p.update_prediction("web", CPU, 1500.0 if i % 12 < 4 else 50.0)
        p.flush(1000.0 + i)
    p.checkpoint(1000.0 + n)
    return p


def test_a_profile_learnt_at_another_tick_starts_again_and_says_so(tmp_path, capsys):
    db = str(tmp_path / "p.db")
    with ProfileStore(db) as st:
        _learn(st, 1.0)
    with ProfileStore(db) as st:
        p = TaskProfiler(lambda t, r: make_forecaster("auto", scale=2000, tick_s=0.5),
                         store=st, interval=0.5)
        assert p.restore("web") == [CPU]
        prof = p.profiles[("web", CPU)]
        assert prof.tick_s == 0.5 and prof.forecaster.tick_s == 0.5
        assert len(prof.history) == 0  # nothing of the 1-s ticks is replayed as 0.5-s ones
    err = capsys.readouterr().err
    assert "learnt at a 1 s tick" in err and "every 0.5 s" in err and "starts again" in err


def test_a_profile_learnt_at_the_same_tick_is_restored(tmp_path, capsys):
    db = str(tmp_path / "p.db")
    with ProfileStore(db) as st:
        _learn(st, 0.5)
    with ProfileStore(db) as st:
        p = TaskProfiler(lambda t, r: make_forecaster("auto", scale=2000, tick_s=0.5),
                         store=st, interval=0.5)
        p.restore("web")
        prof = p.profiles[("web", CPU)]
        assert len(prof.history) == 130 and prof.tick_s == 0.5
    assert "starts again" not in capsys.readouterr().err


def test_a_checkpoint_from_before_profiles_kept_their_tick_reads_its_forecasters():
    """Before, a profile's tick was only its forecaster's (online selection kept one; a plain
    seasonal model none): such a checkpoint says what it knows, None where nothing does."""
    from rswap_ebpf.predict.profile import freeze, thaw

    for spec, want in (({"name": "auto", "tick_s": 2.0}, 2.0), ("last_value", None)):
        prof = TaskProfile("web", CPU, make_forecaster(spec))
        prof.learn_one(3.0)
        del prof.__dict__["tick_s"]
        assert thaw(freeze(prof)).tick_s == want
