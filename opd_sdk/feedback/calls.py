"""Every HTTP call a teacher makes: counted, held to the budget, and kept across retries.

The collector opens a `CallScope` for each request it sends (`scope(...)`, a context
variable, so it reaches the teacher's calls through `asyncio.gather` and nested
composites without being passed along). A teacher that talks HTTP wraps each call:

    async with metered_call(key) as call:     # key: what the call sends (see `call_key`)
        if call.kept is not None:              # answered in an earlier attempt of this request
            return call.kept
        response = await client.post(...)     # raises: the call is counted as failed
        call.replied(usage)                    # the reply carried usage: paid
        call.answered(response)                # its answer is used (and kept for a retry)

`providers.client.Endpoint` does this for every chat / completions call; a teacher
that rejects a reply it was given (a verdict that does not parse, a cut-off reply)
calls `reject(response)`: counted as failed, and not kept.

- Counting: `opd_sdk.feedback.usage.Usage` (paid, answered, failed, tokens, cost).
- Budget, checked before a call is sent: with `budget_usd`, a call goes out only while
  spent + (calls in flight + 1) x the costliest call seen <= budget; while calls in
  flight might still fit it waits for them; when even one more call would not fit,
  `BudgetReached` is raised (the collector records a "budget" failure). Until one call
  has shown its cost, calls go one at a time. So the spend stays within the budget
  unless a call costs more than the costliest one seen before it.
- Kept answers: within one request, an answer that came back is kept until the request
  is done, so a retry after one call failed re-sends that call only (the other verdicts
  of a pairwise preference teacher, the judge's answers under a `Gate`, ...). Identical
  calls within an attempt (n samples of one prompt) are told apart by their order.

Outside a collector (a teacher used on its own, `self_test`) nothing is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any

from opd_sdk.errors import OPDError
from opd_sdk.feedback.usage import Usage
from opd_sdk.types import CallUsage, Feedback, FeedbackFailure, FeedbackRequest


class BudgetReached(OPDError):
    """The budget does not cover another call; nothing was sent. Not a `TeacherError`: a teacher
    must not turn it into a missing score; the collector records a "budget" failure."""


class CallLedger:
    """One collector's counters, prices and budget, with the calls in flight (on its loop)."""

    def __init__(self, usage: Usage, *, budget_usd: float | None, price_per_1k_prompt: float,
                 price_per_1k_completion: float) -> None:
        self.usage, self.budget_usd = usage, budget_usd
        self.prices = (price_per_1k_prompt, price_per_1k_completion)
        self.in_flight = 0
        self._changed: asyncio.Condition | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def refuses(self) -> bool:
        """Whether the budget leaves no room for one more call (none in flight counted)."""
        if self.budget_usd is None:
            return False
        return self.usage.cost_usd + self.usage.max_call_cost_usd > self.budget_usd + 1e-12 or \
            self.usage.cost_usd >= self.budget_usd

    def _fits_now(self) -> bool:
        if self.budget_usd is None:
            return True
        per_call = self.usage.max_call_cost_usd
        if per_call <= 0:  # no call has shown its cost yet: one at a time
            return self.in_flight == 0
        return self.usage.cost_usd + (self.in_flight + 1) * per_call <= self.budget_usd + 1e-12

    def _condition(self) -> asyncio.Condition:
        loop = asyncio.get_running_loop()
        if self._changed is None or self._loop is not loop:
            self._changed, self._loop = asyncio.Condition(), loop
        return self._changed

    async def open_call(self) -> None:
        """Wait until the budget covers one more call in flight; raise BudgetReached when it
        never will. Then the call counts as in flight."""
        if self.budget_usd is not None:
            changed = self._condition()
            async with changed:
                while not self._fits_now():
                    if self.refuses():
                        raise BudgetReached(f"budget of ${self.budget_usd:.4f} reached "
                                            f"(${self.usage.cost_usd:.4f} spent)")
                    await changed.wait()
        self.in_flight += 1

    async def close_call(self, usage: CallUsage | None, answered: bool) -> None:
        self.in_flight -= 1
        self.usage.add_http_call(usage, answered=answered, price_per_1k_prompt=self.prices[0],
                                 price_per_1k_completion=self.prices[1])
        if self.budget_usd is not None:
            changed = self._condition()
            async with changed:
                changed.notify_all()


class CallScope:
    """One request's calls, across the collector's attempts at it (see the module docstring)."""

    def __init__(self, ledger: CallLedger) -> None:
        self.ledger = ledger
        self.kept: dict[str, Any] = {}  # call key -> answer, for the whole request
        self.seen: dict[str, int] = {}  # call key -> times asked in this attempt
        self.calls = 0  # HTTP calls counted in this attempt
        self.metered = False  # the teacher's calls are counted here (not from Feedback.usage)

    def new_attempt(self) -> None:
        self.seen.clear()
        self.calls = 0


_SCOPE: contextvars.ContextVar[CallScope | None] = contextvars.ContextVar("opd_call_scope", default=None)


@contextlib.contextmanager
def scope(current: CallScope) -> Iterator[CallScope]:
    """Make `current` the scope of the calls made inside (and in tasks started inside)."""
    token = _SCOPE.set(current)
    try:
        yield current
    finally:
        _SCOPE.reset(token)


def call_key(*parts: Any) -> str:
    """A short key for what a call sends (endpoint, path, messages or prompt, parameters)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class Call:
    """One HTTP call under `metered_call`; see the module docstring."""

    def __init__(self, key: str | None, kept: Any) -> None:
        self.key, self.kept = key, kept
        self.usage: CallUsage | None = None
        self.answer: Any = None
        self.used = False

    def replied(self, usage: CallUsage | None) -> None:
        """The server replied; `usage` is its token counts (None when it sent none: not paid)."""
        self.usage = usage

    def answered(self, answer: Any) -> None:
        """The reply is a usable answer: counted as answered, kept for a retry of this request."""
        self.answer, self.used = answer, True


@contextlib.asynccontextmanager
async def metered_call(key: str | None = None) -> AsyncIterator[Call]:
    """Count one HTTP call in the current scope, after the budget check (module docstring).

    key: what the call sends (`call_key`); None: never kept. A kept answer comes back as
    `call.kept` and nothing is sent or counted. Raises BudgetReached before sending when the
    budget does not cover the call.
    """
    current = _SCOPE.get()
    if current is None:
        yield Call(None, None)
        return
    current.metered = True
    slot = None
    if key is not None:
        n = current.seen.get(key, 0)
        current.seen[key] = n + 1
        slot = f"{key}#{n}"
        if slot in current.kept:
            yield Call(slot, current.kept[slot])
            return
    await current.ledger.open_call()
    call = Call(slot, None)
    current.calls += 1
    try:
        yield call
    finally:
        await current.ledger.close_call(call.usage, call.used)
        if call.used and slot is not None:
            current.kept[slot] = call.answer


def reject(answer: Any) -> None:
    """The teacher could not use `answer` (a reply counted as answered): count it as failed, and
    do not keep it (a retry asks again)."""
    current = _SCOPE.get()
    if current is None:
        return
    for slot, value in list(current.kept.items()):
        if value is answer:
            del current.kept[slot]
            current.ledger.usage.reject_answer()
            return


async def keep_answer(teacher: Any, request: FeedbackRequest) -> Feedback:
    """`await teacher.feedback(request)`, kept for the retries of the current request when it is an
    answer (not a failure): a composite asks each child through this, so a retry after one child
    failed asks only that child again."""
    current = _SCOPE.get()
    if current is None:
        return await teacher.feedback(request)
    key = "answer:" + call_key(teacher.id, request.canonical_json())
    if key in current.kept:
        return current.kept[key]
    answer = await teacher.feedback(request)
    if not isinstance(answer, FeedbackFailure):
        current.kept[key] = answer
    return answer


async def gather_all(*aws: Awaitable[Any]) -> list[Any]:
    """`asyncio.gather` that lets every sibling finish before raising the first error, so no call
    is left running unseen after its request failed (its answer is kept for the retry, and
    nothing is still in flight when the collector closes)."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return list(results)
