"""Selection by phase: candidates ranked on their losses where the next ticks fall in the season."""
from rswap_ebpf.predict import checkpoint
from rswap_ebpf.predict.phase import PhaseLosses
from rswap_ebpf.predict.selection import AutoForecaster


def _feed(ph: PhaseLosses, periods: int, season: int = 10) -> None:
    for t in range(periods * season):
        burst = t % season == 0
        ph.add("edge", t, season, 0.0 if burst else 2.0)  # good at the burst, bad elsewhere
        ph.add("body", t, season, 3.0 if burst else 0.5)


def test_no_ranking_until_every_slice_ahead_was_seen_in_two_periods():
    ph = PhaseLosses(prior_weight=1)
    _feed(ph, 1)
    assert ph.ranking(10, 1, {"edge": 1.8, "body": 0.75}) is None
    _feed(ph, 2)
    assert ph.ranking(20, 1, {"edge": 1.8, "body": 0.75}) is not None


def test_the_ranking_follows_the_phase_the_overall_loss_does_not():
    ph = PhaseLosses(prior_weight=1)
    _feed(ph, 4)
    overall = {"edge": 1.8, "body": 0.75}
    at_burst = ph.ranking(40, 1, overall)
    between = ph.ranking(43, 1, overall)
    assert at_burst["edge"] < at_burst["body"]
    assert between["body"] < between["edge"]


def test_shrinkage_toward_the_overall_loss():
    """With a heavy prior the slice's own mean hardly counts: the overall order comes back."""
    ph = PhaseLosses(prior_weight=1000)
    _feed(ph, 4)
    r = ph.ranking(40, 1, {"edge": 1.8, "body": 0.75})
    assert r["body"] < r["edge"]


def test_a_new_season_or_a_rebuilt_candidate_starts_again():
    ph = PhaseLosses(prior_weight=1)
    _feed(ph, 4)
    ph.add("edge", 40, 12, 0.0)  # the season changed: what was counted for 10 goes
    assert ph.season == 12 and ph.ranking(41, 1, {"edge": 1.0}) is None
    ph = PhaseLosses(prior_weight=1)
    _feed(ph, 4)
    ph.forget("edge")
    r = ph.ranking(40, 1, {"edge": 1.8, "body": 0.75})
    assert r["edge"] == 1.8  # only its prior is left


def test_old_periods_weigh_less():
    ph = PhaseLosses(prior_weight=0, half_periods=1)
    for t in range(60):  # the burst's loss halves in weight every period
        ph.add("a", t, 10, 10.0 if t < 30 else 0.0)
    r = ph.ranking(60, 1, {"a": 0.0})
    assert 0.0 < r["a"] < 10.0 * 0.5 ** 3 + 1e-6


def test_survives_a_checkpoint():
    ph = PhaseLosses(prior_weight=1)
    _feed(ph, 4)
    back = checkpoint.loads(checkpoint.dumps(ph))
    overall = {"edge": 1.8, "body": 0.75}
    assert back.ranking(40, 3, overall) == ph.ranking(40, 3, overall)


def test_auto_counts_losses_by_phase_and_serves_by_the_phase_ranking():
    a = AutoForecaster(candidates=("last_value", "seasonal_naive"), period=10)
    for i in range(200):
        a.learn_one(10.0 if i % 10 == 0 else 1.0)
    assert a._phase.season == 10
    overall = {n: a._loss[n] for n in a.candidates}
    assert a._phase.ranking(a._at, a.horizon, overall) is not None
    assert a.serving == "seasonal_naive"
    # where the phase ahead says the other model is better, it serves, whatever the overall
    a._phase.ranking = lambda at, horizon, ready: {"last_value": 0.0, "seasonal_naive": 1.0}
    a.learn_one(1.0)
    assert a.serving == "last_value" and a._loss["last_value"] > a._loss["seasonal_naive"]


def test_an_older_checkpoint_without_phase_losses_still_loads():
    a = AutoForecaster(candidates=("last_value", "seasonal_naive"), max_period=20)
    for i in range(100):
        a.learn_one(10.0 if i % 6 == 0 else 1.0)
    state = a.__getstate__()
    del state["_phase"]
    b = AutoForecaster.__new__(AutoForecaster)
    b.__setstate__(state)
    b.learn_one(1.0)
    assert b.forecast(3)
