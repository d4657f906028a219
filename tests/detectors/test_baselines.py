"""The sender habit (detectors/baselines.py) against River, the library it stands for.

``SenderFanout.learn_one`` writes River's Welford update out by hand (a call per message saved): these
check that it keeps exactly River's sums, so that a River upgrade that changes them, or an edit that
reorders the arithmetic, shows here rather than as decisions that drift from the offline scorer's.
"""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st
from river import stats

from detectors.baselines import SenderFanout

deliveries = st.lists(st.integers(min_value=0, max_value=2_000_000), min_size=0, max_size=60)


@given(deliveries)
def test_the_habit_keeps_rivers_welford_sums_bit_for_bit(counts):
    habit, river = SenderFanout(), stats.Var()
    for n in counts:
        habit.learn_one(n)
        river.update(math.log1p(n))
        assert (habit.mean.n, habit.mean.get(), habit._S) == (river.mean.n, river.mean.get(), river._S)
    assert habit.get() == river.get()
    assert habit.max_deliveries == max(counts, default=0)


@given(deliveries, st.integers(min_value=0, max_value=2_000_000))
def test_a_score_is_rivers_mean_and_variance_shrunk_to_the_prior(counts, reach):
    habit, river = SenderFanout(), stats.Var()
    for n in counts:
        habit.learn_one(n)
        river.update(math.log1p(n))
    n, k = river.mean.n, SenderFanout.PRIOR_WEIGHT
    mean = (n * (river.mean.get() if n else 0.0) + k * SenderFanout.PRIOR_MEAN) / (n + k)
    var = (n * (river.get() if n > 1 else 0.0) + k * SenderFanout.PRIOR_VAR) / (n + k)
    assert habit.score_one(reach) == (math.log1p(reach) - mean) / math.sqrt(var)
