"""The data that flows between student, collector and teacher.

A `FeedbackRequest` holds one prompt and the student's completions for it.
A teacher answers with one `Feedback`, a pydantic union discriminated by
`kind`. `FeedbackFailure` is a value, not an exception: the student loop
masks it out and never reads it as a reward.

Everything here round-trips through JSON exactly (it is stored in the cache).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


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
    """One scalar per completion, aligned with `request.completions`."""

    kind: Literal["score"] = "score"
    scores: list[float]


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
    """

    kind: Literal["token_logprobs"] = "token_logprobs"
    logprobs: list[list[float]]
    top_k: list[list[dict[int, float]]] | None = None


class FeedbackFailure(_FeedbackBase):
    """A request that got no usable feedback.

    reason: short text (never contains secrets).
    error_type: the exception class or cause ("timeout", "budget", "http_500").
    attempts: how many times the teacher was called.
    retriable: whether a later run might succeed.
    """

    kind: Literal["failure"] = "failure"
    reason: str
    error_type: str = "error"
    attempts: int = 0
    retriable: bool = False


Preference.model_rebuild()

Feedback = Annotated[
    Union[Score, Preference, Reference, TokenLogprobs, FeedbackFailure],
    Field(discriminator="kind"),
]
FEEDBACK_ADAPTER: TypeAdapter[Feedback] = TypeAdapter(Feedback)


def feedback_from_json(text: str) -> Feedback:
    """Parse one feedback value back from its JSON."""
    return FEEDBACK_ADAPTER.validate_json(text)


def feedback_to_json(feedback: Feedback) -> str:
    return FEEDBACK_ADAPTER.dump_json(feedback).decode()


def is_failure(feedback: Feedback) -> bool:
    return isinstance(feedback, FeedbackFailure)
