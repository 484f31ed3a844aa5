"""The protocol every teacher implements, and the optional capabilities other code reads.

A teacher has a stable `id`: a fingerprint of its model, prompt template and
parameters. The collector's cache is keyed by it, so two teachers that would
answer differently must have different ids, and an id must never contain a
secret. `feedback` answers one request; it raises a `TeacherError` subclass
(opd_sdk.errors) on a failed call; the collector retries by type and turns
the final failure into a `FeedbackFailure` value. Any other exception is a
bug and stops the run.

Optional capabilities, each a small runtime-checkable protocol (the
collector and the trainer test `isinstance(teacher, X)`, never `getattr`):

- `Pointwise`: `pointwise` is True: the collector splits a request with
  several completions into one sub-request per completion (each cached,
  retried and rate-limited on its own) and merges the Scores back in order.
- `CountsCalls`: `api_calls(request) -> int`, HTTP calls one `feedback()`
  makes (what the RPM limit charges; default 1).
- `CustomCacheKey`: `cache_key(request) -> str` (default: the request's
  canonical JSON).
- `BatchTeacher`: `async feedback_batch(requests) -> list[Feedback]`; the
  collector hands it the batch's cache misses in one call.
- `LocalTeacher`: `local` is True and `feedback_local(requests) ->
  list[Feedback]` answers a batch in process, synchronously (no network);
  `opd_sdk.feedback.factory.make_collector` then runs it in the calling thread,
  without a loop, semaphore or retries. Use `is_local(teacher)`.
- `Cacheable`: `cacheable` is False for a teacher whose answers change as the
  student trains (self-distillation in live or EMA mode: it follows the
  student's weights). The collector keeps no cache for it, and the trainer
  never asks it ahead of the step that changes it (`rollout.max_staleness`
  >= 1 is refused). Use `is_cacheable(teacher)` (default True) and
  `follows_student(teacher)`.
- `Closeable`: `async aclose()` releases HTTP clients; the collector calls it
  on close.
- `FollowsStudent`: `on_optimizer_step(step)` is called by the trainer after
  each optimizer step (step = optimizer steps done: 1, 2, ...).
- `Combinator`: `children`, the teachers a composite asks (`providers.compose`).
- `SelfTesting`: `async self_test() -> dict` checks, once before training,
  that the server can do what the teacher needs.
- `Stateful`: `state_dict()` / `load_state_dict(state)`: a teacher that learns
  during the run (GAD's discriminator); saved in every checkpoint and
  restored on resume (`opd_sdk.train.checkpoint`). Use `stateful(teachers)`.
- `ReportsMetrics`: `metrics() -> dict` of its last batch, namespaced
  (`gad/accuracy`); the trainer adds them to the step's row.
- `ChecksPrompts`: `check_prompts(prompts)` raises ConfigError, before
  training, for prompts it cannot answer (the trainer calls it).
- `OwnsCollectors`: `collectors`, the collectors a local teacher asks its own
  teachers through (GAD's reference teacher): their usage counts in the
  run's, and closing the teacher's runner closes them. Use `inner_collectors`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Protocol, Sequence, runtime_checkable

from opd_sdk.types import Feedback, FeedbackRequest


@runtime_checkable
class Teacher(Protocol):
    @property
    def id(self) -> str: ...

    async def feedback(self, request: FeedbackRequest) -> Feedback: ...


@runtime_checkable
class Pointwise(Protocol):
    pointwise: bool


@runtime_checkable
class CountsCalls(Protocol):
    def api_calls(self, request: FeedbackRequest) -> int: ...


@runtime_checkable
class CustomCacheKey(Protocol):
    def cache_key(self, request: FeedbackRequest) -> str: ...


@runtime_checkable
class BatchTeacher(Protocol):
    async def feedback_batch(self, requests: Sequence[FeedbackRequest]) -> list[Feedback]: ...


@runtime_checkable
class LocalTeacher(Protocol):
    local: bool

    def feedback_local(self, requests: Sequence[FeedbackRequest]) -> list[Feedback]: ...


@runtime_checkable
class Cacheable(Protocol):
    cacheable: bool


@runtime_checkable
class Closeable(Protocol):
    async def aclose(self) -> None: ...


@runtime_checkable
class FollowsStudent(Protocol):
    def on_optimizer_step(self, step: int) -> None: ...


@runtime_checkable
class SelfTesting(Protocol):
    async def self_test(self) -> dict: ...


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class ReportsMetrics(Protocol):
    def metrics(self) -> dict[str, float]: ...


@runtime_checkable
class ChecksPrompts(Protocol):
    def check_prompts(self, prompts: Sequence[Any]) -> None: ...


@runtime_checkable
class OwnsCollectors(Protocol):
    collectors: list[Any]


@runtime_checkable
class Combinator(Protocol):
    children: list[Any]


def is_pointwise(teacher: Any) -> bool:
    return isinstance(teacher, Pointwise) and bool(teacher.pointwise)


def is_local(teacher: Any) -> bool:
    """True for a teacher that answers in process (`LocalTeacher` with `local` True)."""
    return isinstance(teacher, LocalTeacher) and bool(teacher.local)


def is_cacheable(teacher: Any) -> bool:
    """False only for a teacher that says its answers change from step to step."""
    return not isinstance(teacher, Cacheable) or bool(teacher.cacheable)


def api_calls(teacher: Any, request: FeedbackRequest) -> int:
    """HTTP calls one `teacher.feedback(request)` makes (1 unless the teacher says)."""
    return int(teacher.api_calls(request)) if isinstance(teacher, CountsCalls) else 1


def leaves(teacher: Any) -> list[Any]:
    """The teachers that answer in `teacher`'s tree: itself, or recursively a `Combinator`'s children."""
    if isinstance(teacher, Combinator):
        return [leaf for child in teacher.children for leaf in leaves(child)]
    return [teacher]


def reads_student(teacher: Any, student: Any) -> list[str]:
    """Ids of the teachers in `teacher`'s tree that hold the `student` model object
    (self-distillation: live, EMA or frozen views of it)."""
    return [leaf.id for leaf in leaves(teacher)
            if hasattr(leaf, "__dict__") and any(value is student for value in vars(leaf).values())]


def follows_student(teacher: Any) -> list[str]:
    """Ids of the teachers in `teacher`'s tree whose answers change as the student trains (not
    cacheable: self-distillation in live or EMA mode). The trainer never asks such a teacher while
    a step changes those weights (`opd_sdk.train.collect.check_collectors`)."""
    return [leaf.id for leaf in leaves(teacher) if not is_cacheable(leaf)]


def stateful(teachers: Sequence[Any]) -> list[Any]:
    """The leaves of `teachers` (in order) that carry state a checkpoint must keep (`Stateful`)."""
    return [leaf for t in teachers for leaf in leaves(t) if isinstance(leaf, Stateful)]


def inner_collectors(teacher: Any) -> list[Any]:
    """The collectors the leaves of `teacher` ask their own teachers through (`OwnsCollectors`)."""
    return [c for leaf in leaves(teacher) if isinstance(leaf, OwnsCollectors) for c in leaf.collectors]


def notify_optimizer_step(teacher: Any, step: int) -> None:
    """Tell `teacher` (if it follows the student) that optimizer step `step` happened."""
    if isinstance(teacher, FollowsStudent):
        teacher.on_optimizer_step(step)


def fingerprint(kind: str, **params: Any) -> str:
    """A stable teacher id: `kind:` + a short hash of the parameters.

    Pass everything that changes the teacher's answers (model, base_url,
    template, temperature...). Never pass an API key.
    """
    blob = json.dumps(params, sort_keys=True, default=str, separators=(",", ":"))
    return f"{kind}:{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A stable identity of a tokenizer: `tok:` + a short hash of its vocabulary, special
    tokens and chat template. Two tokenizers with the same fingerprint encode text to the
    same ids, so a teacher may use a request's token ids as they are. It reads the whole
    vocabulary (tens of ms): compute it once per tokenizer, not per request."""
    vocab = tokenizer.get_vocab()
    blob = json.dumps(
        {
            "vocab": sorted(vocab.items(), key=lambda kv: kv[1]),
            "special": {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())},
            "chat_template": getattr(tokenizer, "chat_template", None),
        },
        sort_keys=True,
        default=str,
    )
    return f"tok:{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
