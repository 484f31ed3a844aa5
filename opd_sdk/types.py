"""The data that flows between student, collector and teacher.

A `FeedbackRequest` holds one prompt and the student's completions for it.
A teacher answers with one `Feedback`, a pydantic union discriminated by
`kind`. `FeedbackFailure` is a value, not an exception: the student loop
masks it out and never reads it as a reward.

Everything here round-trips through JSON exactly (it is stored in the cache).
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

MISSING = math.nan  # a missing score or log-prob: masked by consumers, never a reward
MISSING_LOGPROB = -9999.0  # servers send this (or less) for log(0); stored as NaN


def _missing_to_nan(value: float) -> float:
    return math.nan if value <= MISSING_LOGPROB else value


def _usable(value: float) -> bool:
    return math.isfinite(value)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")


class ChatMessage(_Frozen):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class Completion(_Frozen):
    """One student sample: its text and, where known, its token ids."""

    text: str
    token_ids: list[int] | None = None


class FeedbackRequest(_Frozen):
    """A prompt, the student's completions, and what only the teacher may see.

    prompt: plain text or chat messages (without the completion).
    completions: the student's samples for this prompt (one or more).
    privileged: context the teacher sees and the student does not (a
        reference solution, a hidden rubric, tool output).
    metadata: free-form data that is part of the request's identity (a
        reference answer for a verifier, a task id). It is part of the cache
        key, so keep it deterministic.
    prompt_token_ids: the prompt exactly as the student's tokenizer encoded
        it for sampling (chat template applied, no padding), when known.
    tokenizer: `tokenizer_fingerprint` of the tokenizer that made
        `prompt_token_ids` and the completions' `token_ids`; a teacher with
        the same fingerprint may use those ids as they are.
    """

    prompt: str | list[ChatMessage]
    completions: list[Completion] = Field(min_length=1)
    privileged: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    prompt_token_ids: list[int] | None = None
    tokenizer: str | None = None

    def canonical_json(self) -> str:
        """Stable JSON of the request: the cache key's second half."""
        return json.dumps(
            self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )

    def prompt_messages(self) -> list[ChatMessage]:
        """The prompt as chat messages (a text prompt becomes one user turn)."""
        if isinstance(self.prompt, str):
            return [ChatMessage(role="user", content=self.prompt)]
        return list(self.prompt)

    def prompt_text(self) -> str:
        """The prompt as plain text (chat turns joined, roles labelled)."""
        if isinstance(self.prompt, str):
            return self.prompt
        return "\n\n".join(f"{m.role}: {m.content}" for m in self.prompt)

    def with_completions(self, completions: list[Completion]) -> "FeedbackRequest":
        return self.model_copy(update={"completions": list(completions)})


class CallUsage(_Frozen):
    """What answering one request cost at the teacher: API calls and tokens."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _FeedbackBase(_Frozen):
    """details: teacher-specific extras (raw verdicts, per-call data).
    usage: what the teacher spent producing this answer (counted by the
        collector only when the answer did not come from the cache)."""

    details: dict[str, Any] = Field(default_factory=dict)
    usage: CallUsage = Field(default_factory=CallUsage)


class Score(_FeedbackBase):
    """One scalar per completion, aligned with `request.completions`.

    A completion the teacher could not score (its call failed while the
    others' succeeded; `details["failed"]` maps its index to the reason) has
    NaN (`MISSING`). NaN, +-inf and None (which a custom teacher may send)
    are missing values: a consumer masks them (`valid()`, or
    `math.isfinite`), never reads them as a reward.
    """

    kind: Literal["score"] = "score"
    scores: list[float | None]

    def valid(self) -> list[bool]:
        """Per completion: whether its score is a finite number."""
        return [s is not None and math.isfinite(s) for s in self.scores]


class Preference(_FeedbackBase):
    """Pairwise verdicts: completion `winner` beats `loser` with `probability`.

    probability is P(winner better than loser) in [0.5, 1]; 0.5 is a tie.
    """

    kind: Literal["preference"] = "preference"
    pairs: list["PreferencePair"]


class PreferencePair(_Frozen):
    winner: int
    loser: int
    probability: float = Field(ge=0.0, le=1.0)


class Reference(_FeedbackBase):
    """Teacher-written completions for the prompt (text, maybe token ids)."""

    kind: Literal["reference"] = "reference"
    completions: list[Completion] = Field(min_length=1)


class TokenLogprobs(_FeedbackBase):
    """Teacher log-probability of each token of each student completion.

    logprobs[i][t]: log p_T(y_t | x, y_<t) for completion i, token t.
    top_k[i][t] (optional): the teacher's top-k alternatives at that position
        as {token_id: logprob}. Keys are ints after validation.

    Servers send -9999 (vLLM) or similar for minus infinity, or null (pydantic
    writes -inf as null): any value at or below `MISSING_LOGPROB`, and None,
    is stored as NaN (a missing value, masked and counted by consumers), in
    `logprobs` and in `top_k` alike.
    """

    kind: Literal["token_logprobs"] = "token_logprobs"
    logprobs: list[list[float]]
    top_k: list[list[dict[int, float]]] | None = None

    @field_validator("logprobs", "top_k", mode="before")
    @classmethod
    def _nulls(cls, rows: Any) -> Any:
        """None (a server's null log-prob) as NaN, before the float check would reject it."""
        if not isinstance(rows, list):
            return rows
        if not all(isinstance(row, list) for row in rows):
            return rows
        return [[({k: math.nan if v is None else v for k, v in x.items()} if isinstance(x, dict)
                  else math.nan if x is None else x) for x in row] for row in rows]

    @field_validator("logprobs", mode="after")
    @classmethod
    def _missing_values(cls, rows: list[list[float]]) -> list[list[float]]:
        return [[_missing_to_nan(v) for v in row] for row in rows]

    @field_validator("top_k", mode="after")
    @classmethod
    def _missing_top_k(cls, rows: list[list[dict[int, float]]] | None) -> list[list[dict[int, float]]] | None:
        if rows is None:
            return None
        return [[{k: _missing_to_nan(v) for k, v in entry.items()} for entry in row] for row in rows]

    def n_missing(self) -> int:
        """How many log-probs (selected tokens and top-k entries) are missing (NaN or +inf)."""
        bad = sum(not _usable(v) for row in self.logprobs for v in row)
        if self.top_k is not None:
            bad += sum(not _usable(v) for row in self.top_k for entry in row for v in entry.values())
        return bad


class FeedbackFailure(_FeedbackBase):
    """A request that got no usable feedback.

    reason: short text (never contains secrets).
    error_type: the kind, from the `TeacherError` subclass ("rate_limited",
        "server_error", "timeout", "connection", "bad_response", "client_error",
        "unsupported", "truncated") or the collector ("budget", "cancelled").
    attempts: how many times the teacher was called.
    retriable: whether a later run might succeed.
    status: the HTTP status of the last attempt, when there was one.
    """

    kind: Literal["failure"] = "failure"
    reason: str
    error_type: str = "error"
    attempts: int = 0
    retriable: bool = False
    status: int | None = None

    @classmethod
    def from_error(cls, exc: Any, attempts: int) -> "FeedbackFailure":
        """The failure value for a `TeacherError` (its kind, retriability and status; message redacted;
        `exc.usage`, a CallUsage a provider attaches to an answer it paid for but could not use)."""
        from opd_sdk.redact import redact

        reason = redact(str(exc))[:500] or type(exc).__name__
        usage = getattr(exc, "usage", None)  # calls the teacher was paid for before it failed (a refusal...)
        return cls(reason=reason, error_type=exc.error_type, attempts=attempts, retriable=exc.retriable,
                   status=exc.status, usage=usage if isinstance(usage, CallUsage) else CallUsage())


Preference.model_rebuild()

Feedback = Annotated[
    Union[Score, Preference, Reference, TokenLogprobs, FeedbackFailure],
    Field(discriminator="kind"),
]
FEEDBACK_ADAPTER: TypeAdapter[Feedback] = TypeAdapter(Feedback)
FEEDBACK_CLASSES = (Score, Preference, Reference, TokenLogprobs, FeedbackFailure)  # `Feedback`'s, for isinstance


def feedback_from_json(text: str) -> Feedback:
    """Parse one feedback value back from its JSON."""
    return FEEDBACK_ADAPTER.validate_json(text)


def feedback_to_json(feedback: Feedback) -> str:
    """JSON of one feedback value; NaN and +-inf are written as JSON constants so they round-trip."""
    return feedback.model_dump_json()


def is_failure(feedback: Feedback) -> bool:
    return isinstance(feedback, FeedbackFailure)
