"""Empty answers get no credit, and cost no call.

An empty or whitespace-only completion (`is_empty`) is graded here, before
any teacher call, by the teachers that grade whole completions:

- a Score teacher (`score_nonempty`: JudgeTeacher pointwise and listwise,
  RewardModelTeacher) gives it 0.0, a real verdict (nothing was answered),
  and asks its endpoint about the other completions only; when every
  completion is empty, nothing is sent. (A RewardModelTeacher without
  `normalize` gives it NaN, missing: on a raw reward scale 0.0 may beat a
  wrong answer.) `VerifierTeacher` already scores an
  empty completion 0.0 in process.
- a Preference teacher (`prefer_nonempty`: PreferenceTeacher) records that
  every non-empty completion beats it with probability 1.0 and compares the
  non-empty ones only (two empty completions are not compared);
  `PreferenceScores` gives it 0.0.
- composites follow from their parts: `Gate(verifier, judge)` fails it at
  the verifier (the judge never sees it); `WeightedSum` sums its parts' 0.0.

0.0, not missing: an empty answer is a wrong answer the student should stop
giving, and a missing value would hide it from the loss. Teachers that do
not grade the completion as a whole are not changed: a `ReferenceTeacher`
writes its own answers; a `LogprobTeacher` scores the completion's tokens
(an immediate end-of-sequence token is a token the teacher can judge) and
sends nothing for a completion with no tokens at all.

When some completions were empty, the Score's / Preference's `details`
hold `empty` (their indices), `graded` (the indices sent) and
`graded_details` (the teacher's own details, indexed like `graded`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from opd_sdk.types import Completion, FeedbackRequest, Preference, PreferencePair, Score


def is_empty(completion: Completion) -> bool:
    """Whether a completion's text is empty or whitespace only."""
    return not completion.text.strip()


def empty_indices(request: FeedbackRequest) -> list[int]:
    """Indices of the request's empty completions."""
    return [i for i, c in enumerate(request.completions) if is_empty(c)]


def _split(request: FeedbackRequest) -> tuple[list[int], list[int], FeedbackRequest]:
    empty = empty_indices(request)
    keep = [i for i in range(len(request.completions)) if i not in empty]
    return empty, keep, request.with_completions([request.completions[i] for i in keep])


async def score_nonempty(
    request: FeedbackRequest, grade: Callable[[FeedbackRequest], Awaitable[Score]], empty_score: float = 0.0
) -> Score:
    """`grade(request)` for the non-empty completions; `empty_score` (0.0: the floor of a score in
    [0, 1]) for the empty ones, which are not sent."""
    empty, keep, graded = _split(request)
    if not empty:
        return await grade(request)
    scores: list[float | None] = [empty_score] * len(request.completions)
    details: dict = {"empty": empty, "graded": keep}
    if not keep:
        return Score(scores=scores, details=details)
    part = await grade(graded)
    for k, i in enumerate(keep):
        scores[i] = part.scores[k]
    return Score(scores=scores, details={**details, "graded_details": part.details}, usage=part.usage)


async def prefer_nonempty(
    request: FeedbackRequest, compare: Callable[[FeedbackRequest], Awaitable[Preference]]
) -> Preference:
    """`compare(request)` among the non-empty completions (when two or more); every non-empty
    completion beats every empty one with probability 1.0, without a call."""
    empty, keep, graded = _split(request)
    if not empty:
        return await compare(request)
    pairs = [PreferencePair(winner=i, loser=j, probability=1.0) for i in keep for j in empty]
    details: dict = {"empty": empty, "graded": keep}
    if len(keep) < 2:
        return Preference(pairs=pairs, details=details)
    part = await compare(graded)
    mapped = [PreferencePair(winner=keep[p.winner], loser=keep[p.loser], probability=p.probability)
              for p in part.pairs]
    return Preference(pairs=mapped + pairs, details={**details, "graded_details": part.details}, usage=part.usage)
