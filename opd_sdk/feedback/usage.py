"""What a collector has spent: calls, cache hits, retries, failures, tokens, cost."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from opd_sdk.types import CallUsage


@dataclass
class Usage:
    """Counters of one collector (cumulative across `collect` calls).

    requests_sent: teacher calls made (every attempt, retries included); a LocalRunner
        counts each request its teacher answered.
    retries: attempts after the first one of a request.
    cache_hits: requests answered from the persistent cache.
    deduplicated: requests answered by an identical request in flight.
    failures: FeedbackFailure values returned (budget ones included).
    budget_skipped: requests not sent because the budget was reached.
    api_calls, prompt_tokens, completion_tokens: as reported by the teacher
        (`Feedback.usage`) for answers that did not come from the cache.
        Failed attempts report nothing, so they cost nothing here.
    cost_usd: tokens times the collector's prices.
    """

    requests_sent: int = 0
    retries: int = 0
    cache_hits: int = 0
    deduplicated: int = 0
    failures: int = 0
    budget_skipped: int = 0
    api_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    def add_call_usage(self, usage: CallUsage, *, price_per_1k_prompt: float, price_per_1k_completion: float) -> None:
        self.api_calls += usage.calls
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.completion_tokens
        self.cost_usd += (usage.prompt_tokens * price_per_1k_prompt
                          + usage.completion_tokens * price_per_1k_completion) / 1000.0

    def budget_reached(self, budget_usd: float | None) -> bool:
        return budget_usd is not None and self.cost_usd >= budget_usd

    def as_dict(self) -> dict[str, float]:
        return asdict(self)
