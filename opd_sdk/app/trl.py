"""opd-sdk teachers as reward functions for TRL's GRPOTrainer (and RLOOTrainer).

    from opd_sdk.app.trl import as_reward_func
    reward = as_reward_func(JudgeTeacher("gpt-4o-mini"), rpm=500, cache="judge.sqlite")
    GRPOTrainer(model=..., reward_funcs=[reward], ...)

TRL (1.16) calls a custom reward function as
`f(prompts=, completions=, completion_ids=, **columns)`, where `columns` are
the dataset's other columns (one value per completion) plus `trainer_state`,
`log_extra` and `log_metric`; it wants one float per completion, and reads
`None` as "no reward for this sample" (NaN, left out of the group
statistics). Every call here goes through one collector
(`opd_sdk.feedback.factory.make_collector`: a `FeedbackCollector` for a
remote teacher, in process for a local one), so TRL users get our
concurrency and rate limits, retries honouring Retry-After, the persistent
cache and the budget. A teacher call that still fails comes
back as `None`, never as a 0.0 reward, and the count is logged through
`log_metric` as `opd/teacher/failures`.

Each (prompt, completion) pair is one request with one completion, so each
is cached on its own. The dataset column `answer_column` (default "answer")
goes to `request.metadata["answer"]` (what `VerifierTeacher` reads), and
`privileged_column` to `request.privileged`.
"""

from __future__ import annotations

from typing import Any, Callable

from opd_sdk.errors import ConfigError
from opd_sdk.feedback.factory import Collector, make_collector
from opd_sdk.types import (
    ChatMessage,
    Completion,
    FeedbackFailure,
    FeedbackRequest,
    Score,
)

_TRL_EXTRAS = ("trainer_state", "log_extra", "log_metric", "environments")


def _text(value: Any) -> str:
    """A TRL completion: plain text, or conversational [{"role": "assistant", "content": ...}]."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(m["content"] if isinstance(m["content"], str) else str(m["content"]) for m in value)
    raise ConfigError(f"completion: expected text or a list of messages, got {type(value).__name__}")


def _prompt(value: Any) -> str | list[ChatMessage]:
    if isinstance(value, str):
        return value
    return [ChatMessage(role=m["role"], content=_text([m])) for m in value]


def to_requests(
    prompts: list[Any],
    completions: list[Any],
    columns: dict[str, list[Any]],
    *,
    answer_column: str | None = "answer",
    privileged_column: str | None = "privileged",
) -> list[FeedbackRequest]:
    """One single-completion FeedbackRequest per (prompt, completion) pair, in TRL's order."""
    if len(prompts) != len(completions):
        raise ConfigError(f"got {len(prompts)} prompts for {len(completions)} completions; TRL pairs them one to one")
    requests = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        metadata: dict[str, Any] = {}
        if answer_column and answer_column in columns and columns[answer_column][i] is not None:
            metadata["answer"] = str(columns[answer_column][i])
        privileged = None
        if privileged_column and privileged_column in columns and columns[privileged_column][i] is not None:
            privileged = str(columns[privileged_column][i])
        requests.append(
            FeedbackRequest(
                prompt=_prompt(prompt),
                completions=[Completion(text=_text(completion))],
                privileged=privileged,
                metadata=metadata,
            )
        )
    return requests


def as_reward_func(
    teacher: Any,
    *,
    collector: Collector | None = None,
    answer_column: str | None = "answer",
    privileged_column: str | None = "privileged",
    name: str | None = None,
    **collector_kwargs: Any,
) -> Callable[..., list[float | None]]:
    """A TRL reward function backed by `teacher` through a collector.

    collector: an existing collector (`opd_sdk.feedback.factory.Collector`) to share; else
        `make_collector(teacher, **collector_kwargs)` (max_concurrency, rpm, tpm, timeout, max_retries,
        cache, budget_usd, prices...). The teacher must return `Score`
        feedback (wrap a preference teacher in providers.PreferenceScores).
    The returned function has `.collector` (its usage: `.collector.usage`).
    """
    if collector is None:
        collector_kwargs.setdefault("progress", False)
        collector = make_collector(teacher, **collector_kwargs)
    elif collector_kwargs:
        raise ConfigError("pass either collector= or collector keyword arguments, not both")

    def reward(prompts: list[Any], completions: list[Any], completion_ids: Any = None, **columns: Any):
        log_metric = columns.get("log_metric")
        data = {k: v for k, v in columns.items() if k not in _TRL_EXTRAS}
        requests = to_requests(
            prompts, completions, data, answer_column=answer_column, privileged_column=privileged_column
        )
        rewards: list[float | None] = []
        failures = 0
        for fb in collector.collect_sync(requests):
            if isinstance(fb, FeedbackFailure):
                rewards.append(None)
                failures += 1
            elif isinstance(fb, Score):
                rewards.append(float(fb.scores[0]))
            else:
                raise ConfigError(
                    f"as_reward_func needs Score feedback but the teacher returned '{fb.kind}'; "
                    "wrap a preference teacher in providers.PreferenceScores"
                )
        if callable(log_metric):
            log_metric("opd/teacher/failures", float(failures))
        return rewards

    reward.__name__ = name or f"opd_{type(teacher).__name__}"
    reward.collector = collector  # type: ignore[attr-defined]
    return reward
