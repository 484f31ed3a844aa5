"""Combinators over teachers: weighted sums, gates, preferences as scores.

- `WeightedSum([(teacher, w), ...])`: score_i = sum_k w_k * score_k,i. Any
  part that fails makes the whole a failure (a sum with a missing term is
  not the same reward).
- `Gate(verifier, judge)`: the judge's score counts only for completions the
  verifier passes (score >= threshold); the others get `fail_score` (a real
  verdict: the answer is wrong) and are never sent to the judge.
- `PreferenceScores(preference_teacher, method)`: turns pairwise
  preferences into one score per completion, so a preference teacher can
  drive a reward-weighted objective. "win_rate": mean over the other
  completions of P(i beats j) (a pair not compared counts 0.5).
  "bradley_terry": fit strengths theta (Bradley & Terry, 1952) to the soft
  outcomes by maximum likelihood with a small L2 prior (which keeps theta
  finite when one completion wins every comparison), then report
  mean_j sigmoid(theta_i - theta_j), which is in [0, 1] and equals the
  win rate when the preferences are consistent with a BT model.

The parts' `usage` is summed into the result. Sub-teachers are called
directly, so their answers are cached as part of the composite (the
collector caches the composite's answer under the composite's id).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, Sequence

from opd_sdk.errors import ConfigError, TeacherError
from opd_sdk.teacher import fingerprint
from opd_sdk.types import FeedbackFailure, FeedbackRequest, Preference, Score
from providers.client import add_usage


def _scores(feedback: Any, who: Any, n: int) -> Score:
    if isinstance(feedback, FeedbackFailure):
        raise TeacherError(f"{who!r} failed: {feedback.reason}", retriable=feedback.retriable)
    if not isinstance(feedback, Score) or len(feedback.scores) != n:
        raise TeacherError(f"{who!r} returned {type(feedback).__name__}, need a Score with {n} values",
                           retriable=False)
    return feedback


def _calls(teacher: Any, request: FeedbackRequest) -> int:
    hook = getattr(teacher, "api_calls", None)
    return hook(request) if hook is not None else 1


class WeightedSum:
    """sum_k w_k * score_k for teachers that return Scores."""

    def __init__(self, parts: Sequence[tuple[Any, float]]) -> None:
        if not parts:
            raise ConfigError("WeightedSum needs at least one (teacher, weight) pair")
        self.parts = [(t, float(w)) for t, w in parts]
        self.id = fingerprint("weighted_sum", parts=[[t.id, w] for t, w in self.parts])

    def api_calls(self, request: FeedbackRequest) -> int:
        return sum(_calls(t, request) for t, _ in self.parts)

    def __repr__(self) -> str:
        return f"WeightedSum({[(t, w) for t, w in self.parts]!r})"

    async def feedback(self, request: FeedbackRequest) -> Score:
        n = len(request.completions)
        answers = await asyncio.gather(*(t.feedback(request) for t, _ in self.parts))
        scores = [_scores(a, t, n) for a, (t, _) in zip(answers, self.parts)]
        total = [math.fsum(w * s.scores[i] for s, (_, w) in zip(scores, self.parts)) for i in range(n)]
        return Score(scores=total, details={"parts": [s.scores for s in scores]},
                     usage=add_usage(*(s.usage for s in scores)))


class Gate:
    """The judge's score where the verifier passes, else fail_score."""

    def __init__(self, verifier: Any, judge: Any, *, threshold: float = 1.0, fail_score: float = 0.0) -> None:
        self.verifier, self.judge, self.threshold, self.fail_score = verifier, judge, threshold, fail_score
        self.id = fingerprint("gate", verifier=verifier.id, judge=judge.id, threshold=threshold, fail=fail_score)

    def api_calls(self, request: FeedbackRequest) -> int:
        """An upper bound: the judge is called only on completions that pass."""
        return _calls(self.verifier, request) + _calls(self.judge, request)

    def __repr__(self) -> str:
        return f"Gate({self.verifier!r} -> {self.judge!r})"

    async def feedback(self, request: FeedbackRequest) -> Score:
        n = len(request.completions)
        checked = _scores(await self.verifier.feedback(request), self.verifier, n)
        passed = [i for i, s in enumerate(checked.scores) if s >= self.threshold]
        scores = [self.fail_score] * n
        usage = [checked.usage]
        judged = None
        if passed:
            sub = request.with_completions([request.completions[i] for i in passed])
            judged = _scores(await self.judge.feedback(sub), self.judge, len(passed))
            usage.append(judged.usage)
            for i, s in zip(passed, judged.scores):
                scores[i] = s
        return Score(scores=scores, details={"verifier": checked.scores, "passed": passed,
                                             "judge": judged.scores if judged else []},
                     usage=add_usage(*usage))


def win_rates(pairs: Sequence[Any], n: int) -> list[float]:
    """mean_j P(i beats j) over the other n-1 completions (0.5 for pairs not compared)."""
    p = [[0.5] * n for _ in range(n)]
    for pair in pairs:
        p[pair.winner][pair.loser], p[pair.loser][pair.winner] = pair.probability, 1.0 - pair.probability
    return [sum(p[i][j] for j in range(n) if j != i) / (n - 1) if n > 1 else 0.5 for i in range(n)]


def bradley_terry(pairs: Sequence[Any], n: int, *, l2: float = 1e-3, steps: int = 500) -> list[float]:
    """BT strengths (mean 0) fitted to soft pairwise outcomes by Newton's method.

    Log-likelihood: sum_pairs p log s(ti - tj) + (1 - p) log s(tj - ti) - l2/2 |t|^2, s = sigmoid.
    """
    theta = [0.0] * n
    for _ in range(steps):
        grad = [-l2 * t for t in theta]
        hess = [[(l2 if i == j else 0.0) for j in range(n)] for i in range(n)]  # negative Hessian
        for pair in pairs:
            i, j, p = pair.winner, pair.loser, pair.probability
            s = 1.0 / (1.0 + math.exp(-(theta[i] - theta[j])))
            grad[i] += p - s
            grad[j] -= p - s
            w = s * (1.0 - s)
            hess[i][i] += w
            hess[j][j] += w
            hess[i][j] -= w
            hess[j][i] -= w
        step = _solve(hess, grad)
        theta = [t + d for t, d in zip(theta, step)]
        if max(abs(d) for d in step) < 1e-10:
            break
    mean = sum(theta) / n
    return [t - mean for t in theta]


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (n is a handful of completions)."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for c in range(n):
        piv = max(range(c, n), key=lambda r: abs(m[r][c]))
        m[c], m[piv] = m[piv], m[c]
        for r in range(c + 1, n):
            f = m[r][c] / m[c][c]
            for k in range(c, n + 1):
                m[r][k] -= f * m[c][k]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][k] * x[k] for k in range(r + 1, n))) / m[r][r]
    return x


class PreferenceScores:
    """Scores from a preference teacher: "win_rate" or "bradley_terry"."""

    def __init__(self, teacher: Any, *, method: str = "bradley_terry", l2: float = 1e-3) -> None:
        if method not in ("win_rate", "bradley_terry"):
            raise ConfigError(f"method: 'win_rate' or 'bradley_terry', got {method!r}")
        if l2 <= 0:
            raise ConfigError(f"l2: must be > 0 (it keeps strengths finite), got {l2}")
        self.teacher, self.method, self.l2 = teacher, method, l2
        self.id = fingerprint("preference_scores", teacher=teacher.id, method=method, l2=l2)
        hook = getattr(teacher, "api_calls", None)
        if hook is not None:
            self.api_calls = hook

    def __repr__(self) -> str:
        return f"PreferenceScores({self.teacher!r}, method={self.method!r})"

    async def feedback(self, request: FeedbackRequest) -> Score:
        answer = await self.teacher.feedback(request)
        if isinstance(answer, FeedbackFailure):
            raise TeacherError(f"{self.teacher!r} failed: {answer.reason}", retriable=answer.retriable)
        if not isinstance(answer, Preference):
            raise TeacherError(f"{self.teacher!r} returned {type(answer).__name__}, need a Preference",
                               retriable=False)
        n = len(request.completions)
        if self.method == "win_rate":
            scores = win_rates(answer.pairs, n)
            extra: dict[str, Any] = {}
        else:
            theta = bradley_terry(answer.pairs, n, l2=self.l2)
            sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
            scores = [sum(sig(theta[i] - theta[j]) for j in range(n) if j != i) / (n - 1) for i in range(n)]
            extra = {"theta": theta}
        return Score(scores=scores, details={"method": self.method, **extra}, usage=answer.usage)
