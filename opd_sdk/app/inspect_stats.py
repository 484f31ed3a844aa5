"""The statistics of `opd inspect` (the teacher report): pure functions of plain lists.

Exact implementations, each a few lines, so the report needs nothing beyond
the standard library (tests/app/test_inspect_stats.py checks them against
numbers worked by hand and against scipy where it is installed). A value
that cannot be computed (one class only, a constant input, no pairs) is
None, never a stand-in number.

Groups are lists of per-completion values of one prompt (G values); a
missing value is NaN or None and is left out of every statistic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations

Value = float | None


def finite(x: Value) -> bool:
    return x is not None and math.isfinite(x)


def auc(scores: Sequence[Value], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve of `scores` for the positives in `labels`: the probability that a
    random positive scores above a random negative, ties counted half (Mann-Whitney U / (n+ n-)).
    Pairs with a missing score are left out. None without both a positive and a negative."""
    pos = [s for s, y in zip(scores, labels, strict=True) if finite(s) and y]
    neg = [s for s, y in zip(scores, labels, strict=True) if finite(s) and not y]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties given their average rank (as scipy.stats.rankdata's "average")."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson's correlation; None for fewer than 2 points or a constant input."""
    n = len(x)
    if n < 2:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def spearman(x: Sequence[Value], y: Sequence[Value]) -> float | None:
    """Spearman's rank correlation (Pearson's of the average ranks) over the pairs where both are present."""
    pairs = [(a, b) for a, b in zip(x, y, strict=True) if finite(a) and finite(b)]
    if len(pairs) < 2:
        return None
    return pearson(ranks([a for a, _ in pairs]), ranks([b for _, b in pairs]))


def _sign(v: float) -> int:
    return (v > 0) - (v < 0)


def order_agreement(groups_a: Sequence[Sequence[Value]], groups_b: Sequence[Sequence[Value]],
                    tol: float = 0.0) -> float | None:
    """Rank agreement of two scorings of the same completions: over every pair (i, j) inside a group
    with both values present in both scorings, the share whose order is the same (i above j, below,
    or tied within `tol`) in both. 1.0: the same ranking; about 1/3 for unrelated random scores.
    None without any pair."""
    same = total = 0
    for a, b in zip(groups_a, groups_b, strict=True):
        for i, j in combinations(range(len(a)), 2):
            if not (finite(a[i]) and finite(a[j]) and finite(b[i]) and finite(b[j])):
                continue
            da, db = a[i] - a[j], b[i] - b[j]
            sa = 0 if abs(da) <= tol else _sign(da)
            sb = 0 if abs(db) <= tol else _sign(db)
            same += sa == sb
            total += 1
    return same / total if total else None


def flat_share(groups: Sequence[Sequence[Value]], tol: float = 1e-6) -> float | None:
    """Share of groups (with at least 2 present values) whose values span at most `tol`: all equal,
    so a group-relative advantage is 0 for every completion (no gradient). None without such a group."""
    spans = []
    for g in groups:
        present = [v for v in g if finite(v)]
        if len(present) >= 2:
            spans.append(max(present) - min(present))
    return sum(s <= tol for s in spans) / len(spans) if spans else None


def abs_diffs(a: Sequence[Value], b: Sequence[Value]) -> list[float]:
    """|a_i - b_i| where both are present."""
    return [abs(x - y) for x, y in zip(a, b, strict=True) if finite(x) and finite(y)]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default); None when empty."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


SWAP_CONSISTENT = {("A", "B"), ("B", "A"), ("tie", "tie")}


def swap_agreement(verdicts: Sequence[tuple[str, str]]) -> float | None:
    """Pairwise judge asked (i, j) and (j, i): the share of pairs whose two verdicts name the same
    winner (A then B, B then A, or tie twice). A judge that always answers "A" scores 0. None without pairs."""
    return sum(tuple(v) in SWAP_CONSISTENT for v in verdicts) / len(verdicts) if verdicts else None


def win_rates(n: int, pairs: Sequence[tuple[int, int, float]]) -> list[float]:
    """Per completion, its mean probability of beating the others over the pairs it is in (from
    (winner, loser, P(winner beats loser)) triples); NaN for a completion in no pair."""
    total, count = [0.0] * n, [0] * n
    for w, lo, p in pairs:
        total[w] += p
        total[lo] += 1.0 - p
        count[w] += 1
        count[lo] += 1
    return [t / c if c else math.nan for t, c in zip(total, count, strict=True)]
