"""The one statistics module and the one split: exact on degenerate data, seeded, and the seed-level variation
widens the paired interval."""

import numpy as np
import pytest

from imtune.errors import ImtuneError
from imtune.records.split import holdout_split, n_heldout
from imtune.statistics import bootstrap_mean_ci, mean_stderr, paired_difference, required_n


def test_mean_stderr_and_bootstrap_ci():
    assert mean_stderr([]) == (None, None)
    assert mean_stderr([2.0]) == (2.0, 0.0)
    m, se = mean_stderr([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and se == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    x = np.random.default_rng(1).normal(5, 1, 400)
    lo, hi = bootstrap_mean_ci(x)
    assert lo < x.mean() < hi and hi - lo == pytest.approx(2 * 1.96 / 20, rel=0.2)
    assert bootstrap_mean_ci(x) == [lo, hi]
    assert bootstrap_mean_ci([3.0, 3.0, 3.0]) == [3.0, 3.0]


def test_paired_difference_one_seed_is_the_example_bootstrap():
    a = {str(i): 1.0 for i in range(50)}
    b = {str(i): 0.8 for i in range(50)}
    d = paired_difference(a, b)
    assert d["n"] == 50 and d["n_seeds"] == 1 and d["mean"] == pytest.approx(-0.2) and d["resolved"]
    assert d["ci95"] == pytest.approx([-0.2, -0.2]) and d["per_seed"] == [pytest.approx(-0.2)]
    assert paired_difference({}, {})["n"] == 0


def test_seed_variation_widens_the_interval_and_can_unresolve():
    rng = np.random.default_rng(0)
    ids = [str(i) for i in range(200)]
    noise = {i: rng.normal(0, 0.05) for i in ids}
    a = [{i: 2.0 + noise[i] for i in ids} for _ in range(3)]
    # Each seed's B run differs from A by a seed-level shift of alternating sign: per seed every example agrees,
    # so any one seed alone looks resolved, but across seeds the sign is not stable.
    shifts = [-0.3, 0.25, -0.05]
    b = [{i: 2.0 + noise[i] + s + rng.normal(0, 0.01) for i in ids} for s in shifts]
    one = paired_difference(a[0], b[0])
    assert one["resolved"]
    pooled = paired_difference(a, b)
    assert pooled["n_seeds"] == 3 and pooled["per_seed"] == pytest.approx(shifts, abs=0.01)
    assert not pooled["resolved"] and pooled["ci95"][0] < 0 < pooled["ci95"][1]
    assert pooled["ci95"][1] - pooled["ci95"][0] > 10 * (one["ci95"][1] - one["ci95"][0])
    # Consistent seeds stay resolved.
    same = paired_difference(a, [{i: v - 0.1 for i, v in r.items()} for r in a])
    assert same["resolved"] and same["mean"] == pytest.approx(-0.1)
    with pytest.raises(ValueError):
        paired_difference(a, b[:2])


def test_required_n():
    assert required_n(0.1, 0.5) == 97
    assert required_n(0.0, 0.5) is None and required_n(None, 1.0) is None


def test_holdout_split_deterministic_nested_and_in_file_order():
    recs = list(range(100))
    train, val = holdout_split(recs, 10, seed=3)
    assert len(val) == 10 and len(train) == 90 and sorted(train + val) == recs
    assert val == sorted(val) and train == sorted(train)
    assert holdout_split(recs, 10, seed=3) == (train, val)
    assert holdout_split(recs, 10, seed=4)[1] != val
    t8, v8 = holdout_split(recs, 10, seed=3, n_train=8)
    t16, v16 = holdout_split(recs, 10, seed=3, n_train=16)
    assert v8 == v16 == val and set(t8) < set(t16) < set(train)
    assert n_heldout(100, 0.1) == 10 and n_heldout(3, 0.1) == 1
    with pytest.raises(ImtuneError, match="too few"):
        holdout_split(recs[:3], 3, seed=0)
