"""The one way the project builds a collector: `make_collector(teacher, **limits)`.

    collector = make_collector(teacher, max_concurrency=32, rpm=500, cache="run/feedback_cache.sqlite")
    feedback = collector.collect_sync(requests)   # one Feedback per request, failures as values
    collector.close()

A local teacher (`opd_sdk.feedback.teacher.is_local`: a verifier, self-distillation,
a composite of local teachers) gets an in-process `opd_sdk.feedback.local.LocalRunner`:
asked in the calling thread, with no event loop, timeout or retries. Any other teacher
gets a `opd_sdk.feedback.collector.FeedbackCollector` with the limits. Both are a
`Collector`, the protocol the trainer, the runner and the TRL bridge read. Neither keeps
a cache for a teacher that is not cacheable (`opd_sdk.feedback.cache.collector_cache`).
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

from opd_sdk.errors import ConfigError
from opd_sdk.feedback.collector import FeedbackCollector
from opd_sdk.feedback.local import LocalRunner
from opd_sdk.feedback.teacher import is_local
from opd_sdk.feedback.usage import Usage
from opd_sdk.types import Feedback, FeedbackRequest

# FeedbackCollector's keywords that only concern the network: a LocalRunner ignores them
_NETWORK_LIMITS = ("max_concurrency", "rpm", "tpm", "timeout", "max_retries", "budget_usd",
                   "price_per_1k_prompt_tokens", "price_per_1k_completion_tokens", "progress",
                   "backoff_initial_s", "backoff_max_s", "retry_after_cap_s", "mode", "batch_discount",
                   "batch_poll_s")


@runtime_checkable
class Collector(Protocol):
    """What other code reads from a collector; `FeedbackCollector` and `LocalRunner` implement it.

    teacher: the teacher it asks (the trainer names it in errors and sends it `on_optimizer_step`).
    usage: its cumulative counters (`opd_sdk.feedback.usage.Usage`).
    collect_sync(requests): one Feedback per request, aligned with `requests`; a failure is a
        `FeedbackFailure` value, a teacher's bug propagates.
    collect(requests): the same, awaited.
    close(): releases its loop, clients and the cache it opened; idempotent. Also a context manager.
    """

    teacher: Any
    usage: Usage

    def collect_sync(self, requests: Sequence[FeedbackRequest]) -> list[Feedback]: ...

    async def collect(self, requests: Sequence[FeedbackRequest]) -> list[Feedback]: ...

    def close(self) -> None: ...

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> None: ...


def make_collector(teacher: Any, **limits: Any) -> Collector:
    """The collector for `teacher`: a `LocalRunner` for a local teacher (only `cache` applies to
    it; the network limits are ignored), else `FeedbackCollector(teacher, **limits)`.

    limits: FeedbackCollector's keyword arguments (max_concurrency, rpm, tpm, timeout,
        max_retries, cache, budget_usd, prices, progress, backoff settings, mode and the batch settings).
    Raises TypeError for a keyword FeedbackCollector does not take; ConfigError (from
    FeedbackCollector) for a bad value.
    """
    unknown = sorted(set(limits) - set(_NETWORK_LIMITS) - {"cache"})
    if unknown:
        raise TypeError(f"make_collector got unknown keyword(s) {unknown}; it takes "
                        f"{sorted(_NETWORK_LIMITS + ('cache',))}")
    if is_local(teacher):
        if limits.get("mode") == "batch":
            raise ConfigError(f"mode='batch' is for teachers behind an API; {teacher.id} runs in this process "
                              "(nothing to batch): use mode='online'")
        return LocalRunner(teacher, cache=limits.get("cache"))
    return FeedbackCollector(teacher, **limits)
