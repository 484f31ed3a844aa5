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

The parts' `usage` is summed into the result. Within one request, a child's answer
that came back is kept across the collector's retries (`opd_sdk.feedback.calls.keep_answer`):
when one child fails with a transient error, a retry asks only that child again. Sub-teachers are called
directly, so their answers are cached as part of the composite (the
collector caches the composite's answer under the composite's id).

Missing values: a child score that is None, NaN or inf is a missing value
for that completion in every combinator (NaN, `opd_sdk.types.MISSING`, in the
result: never 0.0, never `fail_score`); when no completion has a score the whole is a
failure. A composite whose children are all local is local itself
(`feedback_local`), forwards `on_optimizer_step` to its children, and is
cacheable only when all its children are.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from opd_sdk.errors import ConfigError, error_from_failure
from opd_sdk.feedback.calls import gather_all, keep_answer
from opd_sdk.feedback.empty import empty_indices
from opd_sdk.feedback.teacher import (
    Closeable,
    api_calls,
    fingerprint,
    is_cacheable,
    is_local,
    notify_optimizer_step,
    uncached_reason,
)
from opd_sdk.types import (
    MISSING,
    Feedback,
    FeedbackFailure,
    FeedbackRequest,
    Preference,
    Score,
)
from providers.client import add_usage


def _missing(value: float | None) -> bool:
    return value is None or not math.isfinite(value)


def _as_score(feedback: Any, who: Any, n: int) -> Score | FeedbackFailure:
    """A child's answer as a Score of n values (None/NaN/inf kept as missing), or its failure."""
    if isinstance(feedback, FeedbackFailure):
        return feedback.model_copy(update={"reason": f"{who!r} failed: {feedback.reason}"})
    if not isinstance(feedback, Score) or len(feedback.scores) != n:
        return FeedbackFailure(reason=f"{who!r} returned {type(feedback).__name__}, need a Score with {n} values",
                               error_type="bad_response")
    return feedback


def _raise_failure(result: Feedback) -> Feedback:
    """Async path: a failure is raised as its typed error, so the collector retries it by type."""
    if isinstance(result, FeedbackFailure):
        raise error_from_failure(result)
    return result


def _all_missing(scores: list[float | None], what: str) -> Feedback | None:
    if scores and all(_missing(s) for s in scores):
        return FeedbackFailure(reason=f"{what}: no completion got a finite score", error_type="bad_response")
    return None


class _Composite:
    """Shared by the combinators: children, locality, caching, close and step hooks."""

    children: list[Any]

    @property
    def local(self) -> bool:
        """In process when every child is (then `make_collector` runs it without a loop)."""
        return all(is_local(t) for t in self.children)

    @property
    def cacheable(self) -> bool:
        return all(is_cacheable(t) for t in self.children)

    @property
    def uncached_reason(self) -> str | None:
        """A child's reason not to be cached (its id cannot cover its answers), if any."""
        return next((why for why in map(uncached_reason, self.children) if why is not None), None)

    def on_optimizer_step(self, step: int) -> None:
        """Forward the trainer's step to every child that follows the student."""
        for child in self.children:
            notify_optimizer_step(child, step)

    async def aclose(self) -> None:
        for child in self.children:
            if isinstance(child, Closeable):
                await child.aclose()

    def feedback_local(self, requests: Sequence[FeedbackRequest]) -> list[Feedback]:
        if not self.local:
            raise ConfigError(f"{self!r} has a remote child; run it through a FeedbackCollector")
        return self._local(list(requests))

    def _local(self, requests: list[FeedbackRequest]) -> list[Feedback]:
        raise NotImplementedError


class WeightedSumParams(BaseModel):
    """WeightedSum takes no parameters besides its (teacher, weight) parts (the config's `teachers`)."""

    model_config = ConfigDict(extra="forbid")


class WeightedSum(_Composite):
    """sum_k w_k * score_k for teachers that return Scores.

    A completion whose score is missing (None, NaN, inf) in any part is missing
    in the sum (NaN): a sum with a missing term is not the same reward. A part
    that fails entirely makes the whole a failure.
    """

    def __init__(self, parts: Sequence[tuple[Any, float]]) -> None:
        if not parts:
            raise ConfigError("WeightedSum needs at least one (teacher, weight) pair")
        self.parts = [(t, float(w)) for t, w in parts]
        if not all(math.isfinite(w) for _, w in self.parts):
            raise ConfigError("WeightedSum weights must be finite numbers")
        self.children = [t for t, _ in self.parts]
        self.id = fingerprint("weighted_sum", parts=[[t.id, w] for t, w in self.parts])

    def api_calls(self, request: FeedbackRequest) -> int:
        return sum(api_calls(t, request) for t, _ in self.parts)

    def __repr__(self) -> str:
        return f"WeightedSum({[(t, w) for t, w in self.parts]!r})"

    def combine(self, request: FeedbackRequest, answers: Sequence[Any]) -> Feedback:
        n = len(request.completions)
        scores = [_as_score(a, t, n) for a, (t, _) in zip(answers, self.parts, strict=True)]
        for s in scores:
            if isinstance(s, FeedbackFailure):
                return s
        total: list[float | None] = []
        for i in range(n):
            values = [s.scores[i] for s in scores]  # type: ignore[union-attr]
            total.append(MISSING if any(_missing(v) for v in values)
                         else math.fsum(w * v for v, (_, w)  # type: ignore[misc]
                                        in zip(values, self.parts, strict=True)))
        return _all_missing(total, "WeightedSum") or Score(
            scores=total, details={"parts": [s.scores for s in scores]},  # type: ignore[union-attr]
            usage=add_usage(*(s.usage for s in scores)))

    async def feedback(self, request: FeedbackRequest) -> Feedback:
        answers = await gather_all(*(keep_answer(t, request) for t, _ in self.parts))
        return _raise_failure(self.combine(request, answers))

    def _local(self, requests: list[FeedbackRequest]) -> list[Feedback]:
        per_part = [t.feedback_local(requests) for t, _ in self.parts]
        return [self.combine(r, [answers[k] for answers in per_part]) for k, r in enumerate(requests)]


class GateParams(BaseModel):
    """Gate's parameters as a config gives them (the `gate` teacher section), with their
    defaults: the constructor's defaults are these."""

    model_config = ConfigDict(extra="forbid")

    threshold: float = 1.0
    fail_score: float = 0.0


_GATE_DEFAULTS = GateParams()


class Gate(_Composite):
    """The judge's score where the verifier passes, else fail_score.

    A completion the verifier could not score (None, NaN, inf) is missing
    (NaN), never `fail_score`; so is one the judge could not score.
    """

    def __init__(
        self, verifier: Any, judge: Any, *, threshold: float = _GATE_DEFAULTS.threshold,
        fail_score: float = _GATE_DEFAULTS.fail_score,
    ) -> None:
        if not (math.isfinite(threshold) and math.isfinite(fail_score)):
            raise ConfigError("Gate: threshold and fail_score must be finite numbers")
        self.verifier, self.judge, self.threshold, self.fail_score = verifier, judge, threshold, fail_score
        self.children = [verifier, judge]
        self.id = fingerprint("gate", verifier=verifier.id, judge=judge.id, threshold=threshold, fail=fail_score)

    def api_calls(self, request: FeedbackRequest) -> int:
        """An upper bound: the judge is called only on completions that pass."""
        return api_calls(self.verifier, request) + api_calls(self.judge, request)

    def __repr__(self) -> str:
        return f"Gate({self.verifier!r} -> {self.judge!r})"

    def passed(self, request: FeedbackRequest, checked: Score) -> list[int]:
        """Indices of the completions the verifier passes (a missing verdict never passes)."""
        return [i for i, s in enumerate(checked.scores) if not _missing(s) and s >= self.threshold]

    def combine(self, request: FeedbackRequest, checked: Score, passed: list[int], judged: Any) -> Feedback:
        scores: list[float | None] = [MISSING if _missing(s) else self.fail_score for s in checked.scores]
        usage = [checked.usage]
        judge_scores: list[float | None] = []
        if passed:
            answer = _as_score(judged, self.judge, len(passed))
            if isinstance(answer, FeedbackFailure):
                return answer
            usage.append(answer.usage)
            judge_scores = list(answer.scores)
            for i, s in zip(passed, answer.scores, strict=True):
                scores[i] = MISSING if _missing(s) else s
        return _all_missing(scores, "Gate") or Score(
            scores=scores, details={"verifier": checked.scores, "passed": passed, "judge": judge_scores},
            usage=add_usage(*usage))

    def _subset(self, request: FeedbackRequest, passed: list[int]) -> FeedbackRequest:
        return request.with_completions([request.completions[i] for i in passed])

    async def feedback(self, request: FeedbackRequest) -> Feedback:
        n = len(request.completions)
        checked = _raise_failure(_as_score(await keep_answer(self.verifier, request), self.verifier, n))
        passed = self.passed(request, checked)
        judged = await keep_answer(self.judge, self._subset(request, passed)) if passed else None
        return _raise_failure(self.combine(request, checked, passed, judged))  # type: ignore[arg-type]

    def _local(self, requests: list[FeedbackRequest]) -> list[Feedback]:
        checks = [_as_score(a, self.verifier, len(r.completions))
                  for a, r in zip(self.verifier.feedback_local(requests), requests, strict=True)]
        plans = [None if isinstance(c, FeedbackFailure) else self.passed(r, c)
                 for c, r in zip(checks, requests, strict=True)]
        asked = [k for k, p in enumerate(plans) if p]
        judged = self.judge.feedback_local([self._subset(requests[k], plans[k]) for k in asked]) if asked else []
        by_k = dict(zip(asked, judged, strict=True))
        return [c if isinstance(c, FeedbackFailure) else self.combine(r, c, plans[k], by_k.get(k))
                for k, (c, r) in enumerate(zip(checks, requests, strict=True))]


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
        theta = [t + d for t, d in zip(theta, step, strict=True)]
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


class PreferenceScoresParams(BaseModel):
    """PreferenceScores' parameters as a config gives them (the `preference_to_score` teacher
    section), with their defaults: the constructor's defaults are these."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["bradley_terry", "win_rate"] = "bradley_terry"
    l2: float = Field(1e-3, gt=0.0)


_SCORES_DEFAULTS = PreferenceScoresParams()


class PreferenceScores(_Composite):
    """Scores from a preference teacher: "win_rate" or "bradley_terry".

    A pair whose probability is not finite makes the request a failure (a
    missing comparison is not a tie); a score that comes out non-finite is NaN.
    """

    def __init__(
        self, teacher: Any, *, method: str = _SCORES_DEFAULTS.method, l2: float = _SCORES_DEFAULTS.l2
    ) -> None:
        if method not in ("win_rate", "bradley_terry"):
            raise ConfigError(f"method: 'win_rate' or 'bradley_terry', got {method!r}")
        if l2 <= 0:
            raise ConfigError(f"l2: must be > 0 (it keeps strengths finite), got {l2}")
        self.teacher, self.method, self.l2 = teacher, method, l2
        self.children = [teacher]
        self.id = fingerprint("preference_scores", teacher=teacher.id, method=method, l2=l2)

    def api_calls(self, request: FeedbackRequest) -> int:
        return api_calls(self.teacher, request)

    def __repr__(self) -> str:
        return f"PreferenceScores({self.teacher!r}, method={self.method!r})"

    def combine(self, request: FeedbackRequest, answer: Any) -> Feedback:
        if isinstance(answer, FeedbackFailure):
            return answer.model_copy(update={"reason": f"{self.teacher!r} failed: {answer.reason}"})
        if not isinstance(answer, Preference):
            return FeedbackFailure(reason=f"{self.teacher!r} returned {type(answer).__name__}, need a Preference",
                                   error_type="bad_response")
        if not all(math.isfinite(p.probability) for p in answer.pairs):
            return FeedbackFailure(reason=f"{self.teacher!r} returned a pair with a non-finite probability",
                                   error_type="bad_response", retriable=True)
        n = len(request.completions)
        if self.method == "win_rate":
            raw = win_rates(answer.pairs, n)
            extra: dict[str, Any] = {}
        else:
            theta = bradley_terry(answer.pairs, n, l2=self.l2)
            sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
            raw = [sum(sig(theta[i] - theta[j]) for j in range(n) if j != i) / (n - 1) for i in range(n)]
            extra = {"theta": theta}
        scores: list[float | None] = [MISSING if _missing(s) else s for s in raw]
        for i in empty_indices(request):  # no credit for an empty answer (opd_sdk.feedback.empty)
            scores[i] = 0.0
        return _all_missing(scores, "PreferenceScores") or Score(
            scores=scores, details={"method": self.method, **extra}, usage=answer.usage)

    async def feedback(self, request: FeedbackRequest) -> Feedback:
        return _raise_failure(self.combine(request, await keep_answer(self.teacher, request)))

    def _local(self, requests: list[FeedbackRequest]) -> list[Feedback]:
        return [self.combine(r, a) for r, a in zip(requests, self.teacher.feedback_local(requests), strict=True)]
