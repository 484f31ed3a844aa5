"""The teacher report's statistics (opd_sdk.app.inspect_stats), against numbers worked by hand and scipy."""

from __future__ import annotations

import math
import random

import pytest

from opd_sdk.app.inspect_stats import (
    auc,
    flat_share,
    order_agreement,
    percentile,
    ranks,
    spearman,
    swap_agreement,
    win_rates,
)


def test_auc_counts_ties_half_and_skips_missing_scores():
    # positives 0.9, 0.5; negatives 0.5, 0.1: pairs (0.9>0.5) (0.9>0.1) (0.5=0.5 -> 1/2) (0.5>0.1) = 3.5 / 4
    assert auc([0.9, 0.5, 0.5, 0.1, math.nan], [True, True, False, False, True]) == pytest.approx(0.875)
    assert auc([0.1, 0.2], [True, True]) is None  # one class only: no AUC, not 0.5


def test_ranks_average_ties_and_spearman_of_a_reversed_order_is_minus_one():
    assert ranks([10, 20, 20, 5]) == [2.0, 3.5, 3.5, 1.0]
    assert spearman([1, 2, 3, 4], [8, 6, 4, 2]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None  # constant: undefined


def test_auc_and_spearman_equal_scipy_on_random_data():
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    x = [rng.randint(0, 5) for _ in range(40)]
    y = [rng.randint(0, 5) + xi for xi in x]
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)
    labels = [v >= 5 for v in y]
    u = stats.mannwhitneyu([a for a, b in zip(x, labels) if b], [a for a, b in zip(x, labels) if not b]).statistic
    assert auc(x, labels) == pytest.approx(u / (sum(labels) * (len(labels) - sum(labels))))


def test_order_agreement_compares_rankings_inside_groups():
    same = [[0.1, 0.5, 0.9], [1.0, 0.0]]
    assert order_agreement(same, [[0.2, 0.6, 1.0], [0.7, 0.3]]) == 1.0  # shifted values, same order
    # group 1 pairs: (0,1) < vs <, (0,2) < vs >, (1,2) < vs > -> 1 of 3; group 2: > vs = -> 0 of 1
    assert order_agreement(same, [[0.5, 0.6, 0.1], [0.4, 0.4]]) == pytest.approx(1 / 4)
    assert order_agreement([[0.1, math.nan]], [[0.2, 0.3]]) is None  # no pair with both values


def test_flat_share_counts_groups_without_spread():
    assert flat_share([[0.5, 0.5, 0.5], [0.1, 0.9], [0.3, math.nan, 0.3], [0.7]], tol=1e-6) == pytest.approx(2 / 3)
    assert flat_share([[0.4, 0.41]], tol=0.05) == 1.0


def test_swap_agreement_and_win_rates():
    assert swap_agreement([("A", "B"), ("A", "A"), ("tie", "tie"), ("B", "tie")]) == 0.5
    assert swap_agreement([]) is None
    # 0 beats 1 with 0.75, 2 beats 0 with 1.0: 0 -> (0.75 + 0) / 2, 1 -> 0.25, 2 -> 1.0
    assert win_rates(3, [(0, 1, 0.75), (2, 0, 1.0)]) == [0.375, 0.25, 1.0]


def test_percentile_interpolates_like_numpy():
    np = pytest.importorskip("numpy")
    xs = [0.3, 0.1, 0.9, 0.4, 0.2]
    for q in (0, 50, 95, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert percentile([], 50) is None
