"""What a collector has spent: requests, HTTP calls (paid, answered, failed), tokens, cost.

Two levels are counted apart. A *request* is one `teacher.feedback(...)` attempt the
collector makes (`requests_sent`, `retries`); an *HTTP call* is one call to the
teacher's server (`http_calls`): a judge that re-asks, a pairwise preference
teacher or a schema fallback makes several calls per request.

Every HTTP call is counted where it is made (`opd_sdk.feedback.calls`), whatever
came of it: a reply that carried `usage` is *paid* (its tokens and cost count,
also when its answer did not parse, was a refusal, was cut off, or came with an
error object in a 200); a call whose answer went into the feedback is
*answered*; every other call is *failed* (an error status, no connection, a
timeout, or a paid reply the teacher could not use). So `http_calls ==
calls_answered + calls_failed`, and `calls_paid` may be larger than
`calls_answered`.

A teacher that does not make its calls through `providers.client.Endpoint` (a
custom one) is counted from the `Feedback.usage` it returns (then only answers
that came back are counted; see README, "How cost is counted").

Spend journal: with `journal` set (the trainer sets `output_dir/teacher_spend-<i>.jsonl`),
every counted call is appended to it at once, so the calls paid in a step that was
killed still reach the cost of the resumed run (`restore`).
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from opd_sdk.types import CallUsage

# the counters a spend-journal line may carry (one HTTP call, or one answer of a custom teacher)
_JOURNALLED = ("requests_sent", "retries", "http_calls", "calls_paid", "calls_answered", "calls_failed", "prompt_tokens",
               "completion_tokens", "cost_usd")


@dataclass
class Usage:
    """Counters of one collector (cumulative across `collect` calls, and across resumes of a run).

    requests_sent: teacher requests made (every attempt, retries included); a LocalRunner
        counts each request its teacher answered.
    retries: attempts after the first one of a request.
    cache_hits: requests answered from the persistent cache.
    deduplicated: requests answered by an identical request in flight.
    failures: FeedbackFailure values returned (budget ones included).
    budget_skipped: requests not sent because the budget was reached.
    http_calls: HTTP calls sent to the teacher's server (see the module docstring).
    calls_paid: calls whose reply carried `usage` (billed), whatever came of them.
    calls_answered: calls whose answer was used; calls_failed: the other calls sent.
    api_calls: calls counted toward cost (`calls_paid`, plus the calls a custom teacher reports).
    prompt_tokens, completion_tokens: of every paid call.
    cost_usd: tokens times the collector's prices.
    max_call_cost_usd: the costliest single call seen (what the budget reserves per call in flight).
    """

    requests_sent: int = 0
    retries: int = 0
    cache_hits: int = 0
    deduplicated: int = 0
    failures: int = 0
    budget_skipped: int = 0
    http_calls: int = 0
    calls_paid: int = 0
    calls_answered: int = 0
    calls_failed: int = 0
    api_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    max_call_cost_usd: float = 0.0
    journal: Path | None = field(default=None, repr=False, compare=False)
    _lock: Any = field(default_factory=threading.Lock, repr=False, compare=False)

    # ----- counting ----------------------------------------------------------
    def add_call_usage(self, usage: CallUsage, *, price_per_1k_prompt: float, price_per_1k_completion: float,
                       answered: bool = True) -> float:
        """Count the calls a custom teacher reports in `Feedback.usage` (paid, and answered unless
        told otherwise); returns their cost in USD."""
        cost = (usage.prompt_tokens * price_per_1k_prompt + usage.completion_tokens * price_per_1k_completion) / 1000.0
        calls = usage.calls
        self._add({"http_calls": calls, "calls_paid": calls, "calls_answered": calls if answered else 0,
                   "calls_failed": 0 if answered else calls, "prompt_tokens": usage.prompt_tokens,
                   "completion_tokens": usage.completion_tokens, "cost_usd": cost})
        if calls:
            self.max_call_cost_usd = max(self.max_call_cost_usd, cost / calls)
        return cost

    def add_http_call(self, usage: CallUsage | None, *, answered: bool, price_per_1k_prompt: float,
                      price_per_1k_completion: float) -> float:
        """Count one HTTP call: `usage` is its reply's token counts (None: no reply, or one without
        `usage`: not paid); answered: its answer was used. Returns its cost in USD."""
        cost = 0.0
        delta = {"http_calls": 1, "calls_answered": int(answered), "calls_failed": int(not answered)}
        if usage is not None:
            cost = (usage.prompt_tokens * price_per_1k_prompt
                    + usage.completion_tokens * price_per_1k_completion) / 1000.0
            delta.update(calls_paid=1, prompt_tokens=usage.prompt_tokens,
                         completion_tokens=usage.completion_tokens, cost_usd=cost)
            self.max_call_cost_usd = max(self.max_call_cost_usd, cost)
        self._add(delta)
        return cost

    def count_request(self, *, retry: bool) -> None:
        """One teacher request sent (an attempt; `retry`: not the request's first)."""
        self._add({"requests_sent": 1, "retries": int(retry)})

    def reject_answer(self) -> None:
        """A call counted as answered turned out unusable (the teacher could not read it)."""
        self._add({"calls_answered": -1, "calls_failed": 1})

    def _add(self, delta: dict[str, float]) -> None:
        with self._lock:
            for name, value in delta.items():
                setattr(self, name, getattr(self, name) + value)
            self.api_calls += int(delta.get("calls_paid", 0))
            if self.journal is not None:
                line = json.dumps({k: v for k, v in delta.items() if v}, separators=(",", ":"))
                with open(self.journal, "a", encoding="utf-8") as f:
                    f.write(line + "\n")

    def budget_reached(self, budget_usd: float | None) -> bool:
        return budget_usd is not None and self.cost_usd >= budget_usd

    # ----- persisting --------------------------------------------------------
    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("journal", "_lock")}

    def journal_offset(self) -> int:
        """Bytes in the spend journal so far (0 without one): a checkpoint stores it beside `as_dict()`."""
        try:
            return os.path.getsize(self.journal) if self.journal is not None else 0
        except OSError:
            return 0

    def restore(self, saved: dict[str, Any], *, journal_offset: int = 0) -> None:
        """Continue from a checkpoint's counters (`as_dict()`), then add the calls the journal
        recorded after that checkpoint was written (paid in a step that did not finish)."""
        with self._lock:
            for f in fields(self):
                if f.name in saved and f.name not in ("journal", "_lock"):
                    setattr(self, f.name, type(getattr(self, f.name))(saved[f.name]))
            for entry in _journal_tail(self.journal, journal_offset):
                for name in _JOURNALLED:
                    setattr(self, name, getattr(self, name) + entry.get(name, 0))
                self.api_calls += int(entry.get("calls_paid", 0))


def _journal_tail(path: Path | None, offset: int) -> list[dict[str, Any]]:
    """The journal's entries after byte `offset` (a line cut off by a kill is skipped)."""
    if path is None or not Path(path).exists():
        return []
    with open(path, "rb") as f:
        f.seek(offset)
        lines = f.read().decode("utf-8", "replace").splitlines()
    out = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out
