"""A teacher's answers: checked against their request, and a pointwise teacher's merged.

`check_shape` is what the collector (and `opd_sdk.feedback.local.LocalRunner`) applies to every
answer before it is cached or used; `merge_pointwise` joins the one-completion answers of a
pointwise teacher (`opd_sdk.feedback.teacher.Pointwise`) into the group's Score.
"""

from __future__ import annotations

from typing import Any

from opd_sdk.errors import BadResponse
from opd_sdk.types import (
    FEEDBACK_CLASSES,
    MISSING,
    CallUsage,
    Feedback,
    FeedbackFailure,
    FeedbackRequest,
    Score,
    TokenLogprobs,
)


def check_shape(feedback: Any, request: FeedbackRequest) -> Feedback:
    """`feedback` if it is a Feedback value that fits `request`; else BadResponse (not retried)."""
    n = len(request.completions)
    if not isinstance(feedback, FEEDBACK_CLASSES):
        raise BadResponse(f"teacher returned {type(feedback).__name__}, not a Feedback value", retriable=False)
    if isinstance(feedback, Score) and len(feedback.scores) != n:
        raise BadResponse(f"teacher returned {len(feedback.scores)} scores for {n} completions", retriable=False)
    if isinstance(feedback, TokenLogprobs) and len(feedback.logprobs) != n:
        raise BadResponse(f"teacher returned log-probs for {len(feedback.logprobs)} of {n} completions",
                          retriable=False)
    return feedback


def merge_pointwise(parts: list[Feedback]) -> Feedback:
    """Merge per-completion Scores (pointwise teacher) into one Score, in order.

    A completion whose call failed gets NaN (`MISSING`: a missing value, never a reward) and its
    failure in `details["failed"]`; the others keep their scores. Only when every
    completion failed is the whole a FeedbackFailure.
    """
    failed = {i: p for i, p in enumerate(parts) if isinstance(p, FeedbackFailure)}
    if len(failed) == len(parts):
        first = parts[0]
        assert isinstance(first, FeedbackFailure)
        return FeedbackFailure(
            reason=f"all {len(parts)} completions failed; first: {first.reason}",
            error_type=first.error_type,
            attempts=max(p.attempts for p in failed.values()),
            retriable=all(p.retriable for p in failed.values()),
            status=first.status,
        )
    ok = [p for p in parts if not isinstance(p, FeedbackFailure)]
    if not all(isinstance(p, Score) and len(p.scores) == 1 for p in ok):
        kinds = sorted({p.kind for p in ok})
        return FeedbackFailure(reason=f"pointwise teacher returned {kinds}; only one-value scores can be merged",
                               error_type="bad_response")
    usage = CallUsage(calls=sum(p.usage.calls for p in ok),
                      prompt_tokens=sum(p.usage.prompt_tokens for p in ok),
                      completion_tokens=sum(p.usage.completion_tokens for p in ok))
    details: dict[str, Any] = {"pointwise": [None if i in failed else p.details for i, p in enumerate(parts)]}
    if failed:
        details["failed"] = {i: {"reason": f.reason, "error_type": f.error_type, "retriable": f.retriable}
                             for i, f in failed.items()}
    return Score(scores=[MISSING if i in failed else p.scores[0] for i, p in enumerate(parts)],  # type: ignore[union-attr]
                 usage=usage, details=details)
