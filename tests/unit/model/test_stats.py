"""The one quantile helper (rswap_ebpf/model/stats.py) agrees with numpy's definitions."""
from __future__ import annotations

import doctest

import numpy as np
import pytest
from hypothesis import given, strategies as st

from rswap_ebpf.model import stats
from rswap_ebpf.model.stats import quantile


def test_docstring_examples_hold():
    assert doctest.testmod(stats).failed == 0


@given(st.lists(st.floats(0, 1e9, allow_nan=False), min_size=1, max_size=60),
       st.floats(0, 1), st.sampled_from(stats.METHODS))
def test_matches_numpy_quantile(xs, q, method):
    assert quantile(xs, q, method) == pytest.approx(float(np.quantile(xs, q, method=method)),
                                                    rel=1e-9, abs=1e-9)


def test_higher_at_the_90th_is_the_nearest_rank_replay_s_vpa_used():
    """replay's VPA took ``xs[min(n - 1, int(0.9 * n))]``; ``higher`` is that for every n."""
    for n in range(1, 2000):
        xs = list(range(n))
        assert quantile(xs, 0.9, "higher") == xs[min(n - 1, int(0.9 * n))]


def test_empty_is_zero_and_bad_arguments_are_refused():
    assert quantile([], 0.9, "lower") == 0.0
    with pytest.raises(ValueError, match="between 0 and 1"):
        quantile([1.0], 1.5)
    with pytest.raises(ValueError, match="method"):
        quantile([1.0], 0.5, "nearest")
