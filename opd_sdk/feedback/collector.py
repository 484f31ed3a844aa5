"""FeedbackCollector: every teacher call goes through here.

One `collect(requests)` turns a batch of FeedbackRequests into a list of
Feedback aligned with it. Per request it: looks in the persistent cache;
joins an identical request already in flight; waits for a concurrency slot
and the RPM/TPM buckets; calls the teacher under a per-call timeout; retries
retriable `TeacherError`s with backoff, honouring the server's Retry-After;
counts every HTTP call the teacher makes (paid, answered, failed), holds each
call to the budget before it is sent, and keeps the answers that came back
across a request's retries (`opd_sdk.feedback.calls`); and turns a final
error into a `FeedbackFailure` value with the attempt count. After a 401/403
(`AuthenticationFailed`) nothing more is sent (`auth_failure`); a request's
final failure is logged in full the first time, identical ones are summarised. A 429 with
Retry-After pauses every new call of the collector, not just the one that
got it. A failure is never cached and never becomes a reward.

Optional teacher capabilities are the protocols of `opd_sdk.feedback.teacher`
(`Pointwise`, `CountsCalls`, `CustomCacheKey`, `BatchTeacher`, `Closeable`),
tested with isinstance.

Errors: a `TeacherError` subclass is retried or not by its type and becomes a
`FeedbackFailure` whose `error_type` is the type's kind. Any other exception
out of a teacher is a bug: it propagates out of `collect` / `collect_sync`
(the run stops with its traceback), never a masked failure.

The torch loop is synchronous: `collect_sync` is the one place it enters
asyncio. It runs the collection on the collector's own background event loop
(one per collector, kept for its lifetime so the teacher's HTTP connection
pool stays on one loop), so it works from plain code and from inside a
running loop (a notebook, or a thread of an async app) alike. Use either
`collect_sync` or `await collect` with one collector, not both. `close()`
shuts the loop down cleanly: the teacher's HTTP clients made on it are closed
on it (see `providers.client.Endpoint`).

The project's own code builds its collectors with `opd_sdk.feedback.factory.make_collector`,
which gives a local teacher (`opd_sdk.feedback.teacher.is_local`) an in-process
`opd_sdk.feedback.local.LocalRunner` instead: given here, a local teacher runs synchronously
on the collector's loop thread, where the per-call timeout cannot interrupt it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from opd_sdk.constants import (
    DEFAULT_MAX_CONCURRENCY,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT_S,
    DRAIN_TIMEOUT_S,
    INITIAL_BACKOFF_S,
    MAX_BACKOFF_S,
    MAX_RETRY_AFTER_S,
)
from opd_sdk.errors import (
    AuthenticationFailed,
    BadResponse,
    ConfigError,
    RateLimited,
    TeacherError,
    TeacherTimeout,
)
from opd_sdk.feedback.answers import check_shape, merge_pointwise
from opd_sdk.feedback.batch import BATCH_DISCOUNT, BATCH_POLL_S, BatchLedger, BatchMode
from opd_sdk.feedback.cache import FeedbackCache, collector_cache
from opd_sdk.feedback.calls import BudgetReached, CallLedger, CallScope
from opd_sdk.feedback.calls import scope as call_scope
from opd_sdk.feedback.ratelimit import RateLimiter, estimate_tokens
from opd_sdk.feedback.retry import retrying
from opd_sdk.feedback.teacher import (
    BatchTeacher,
    Closeable,
    CustomCacheKey,
    Teacher,
    api_calls,
    is_pointwise,
)
from opd_sdk.feedback.usage import Usage
from opd_sdk.redact import redact
from opd_sdk.types import FEEDBACK_CLASSES, Feedback, FeedbackFailure, FeedbackRequest

log = logging.getLogger("opd_sdk.feedback.collector")


class _AuthRefused(Exception):
    """The teacher refused the key earlier; this attempt was not sent."""


def _unanswered(exc: BaseException) -> FeedbackFailure:
    kind = "cancelled" if isinstance(exc, asyncio.CancelledError) else type(exc).__name__
    return FeedbackFailure(reason=redact(f"not answered: {type(exc).__name__}: {exc}")[:500], error_type=kind)


class FeedbackCollector:
    """Async batched feedback collection with limits, retries, cache and budget.

    teacher: any `opd_sdk.Teacher`.
    max_concurrency: teacher calls in flight at once.
    rpm, tpm: requests / tokens per minute (None: no limit). A teacher whose
        feedback() makes several HTTP calls says so with `api_calls(request)`.
    timeout: seconds per teacher call (each attempt); a timeout is retriable.
    max_retries: attempts after the first for retriable errors.
    cache: a FeedbackCache or a path to one (None: no cache). Ignored for a teacher that is
        not cacheable (its answers change as the student trains): then `self.cache` is None
        (`opd_sdk.feedback.cache.collector_cache`).
    budget_usd: USD for the run (needs prices; `usage.restore` carries it across resumes).
        Checked before each HTTP call is sent, counting the calls in flight
        (`opd_sdk.feedback.calls`); once it does not cover another call, requests
        become "budget" failures, unsent.
    price_per_1k_*: USD per 1000 prompt / completion tokens.
    progress: show a tqdm bar (None: only when stderr is a terminal).
    mode: "online" (each call answered within seconds) or "batch": through the OpenAI Batch API
        at `batch_discount` off the prices, polled every `batch_poll_s` (first, longest wait);
        needs a cache (pending batch ids are kept beside it). See `opd_sdk.feedback.batch`.
    """

    def __init__(
        self,
        teacher: Any,
        *,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        rpm: float | None = None,
        tpm: float | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
        cache: FeedbackCache | str | Path | None = None,
        budget_usd: float | None = None,
        price_per_1k_prompt_tokens: float = 0.0,
        price_per_1k_completion_tokens: float = 0.0,
        progress: bool | None = None,
        backoff_initial_s: float = INITIAL_BACKOFF_S,
        backoff_max_s: float = MAX_BACKOFF_S,
        retry_after_cap_s: float = MAX_RETRY_AFTER_S,
        mode: str = "online",
        batch_discount: float = BATCH_DISCOUNT,
        batch_poll_s: tuple[float, float] = BATCH_POLL_S,
    ) -> None:
        if not isinstance(teacher, Teacher) or not isinstance(teacher.id, str):
            raise ConfigError("teacher must have a string `id` and an async `feedback(request)` method "
                              f"(see opd_sdk.Teacher); got {type(teacher).__name__}")
        if not (isinstance(max_concurrency, int) and max_concurrency >= 1):
            raise ConfigError(f"max_concurrency must be an integer >= 1, got {max_concurrency!r}")
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if not (isinstance(max_retries, int) and max_retries >= 0):
            raise ConfigError(f"max_retries must be an integer >= 0, got {max_retries!r}")
        if budget_usd is not None and not budget_usd >= 0:
            raise ConfigError(f"budget_usd must be >= 0 or None, got {budget_usd!r}")
        if price_per_1k_prompt_tokens < 0 or price_per_1k_completion_tokens < 0:
            raise ConfigError("prices per 1k tokens must be >= 0")
        if budget_usd is not None and price_per_1k_prompt_tokens == 0 and price_per_1k_completion_tokens == 0:
            raise ConfigError("budget_usd needs a price: set price_per_1k_prompt_tokens and/or "
                              "price_per_1k_completion_tokens, or drop the budget")
        self.teacher = teacher
        self.max_concurrency = max_concurrency
        self.limiter = RateLimiter(rpm, tpm)
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.cache, self._owns_cache = collector_cache(teacher, cache)
        self.budget_usd = budget_usd
        self.price_prompt = float(price_per_1k_prompt_tokens)
        self.price_completion = float(price_per_1k_completion_tokens)
        self.progress = sys.stderr.isatty() if progress is None else bool(progress)
        self._backoff = (backoff_initial_s, backoff_max_s, retry_after_cap_s)
        self.usage = Usage()
        self.batch = self._batch_mode(mode, batch_discount, batch_poll_s)
        self._ledger = CallLedger(self.usage, budget_usd=budget_usd, price_per_1k_prompt=self.price_prompt,
                                  price_per_1k_completion=self.price_completion)
        self.auth_failure: FeedbackFailure | None = None  # the server refused the key: nothing more is sent
        self._failed: collections.Counter = collections.Counter()
        self._shown: set[tuple[str, str]] = set()
        self._inflight: dict[str, asyncio.Future] = {}
        self._tasks: set[asyncio.Task] = set()
        self._slots: asyncio.Semaphore | None = None
        self._slots_loop: asyncio.AbstractEventLoop | None = None
        self._sync_loop: asyncio.AbstractEventLoop | None = None
        self._sync_thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return (f"FeedbackCollector(teacher={self.teacher.id!r}, max_concurrency={self.max_concurrency}, "
                f"timeout={self.timeout}, max_retries={self.max_retries}, cache={self.cache!r})")

    # ----- public API --------------------------------------------------------
    @property
    def in_flight(self) -> int:
        """Teacher calls sent and not answered yet (a stopping run waits for them, `close`)."""
        return sum(not t.done() for t in list(self._tasks))

    async def collect(self, requests: Sequence[FeedbackRequest]) -> list[Feedback]:
        """One Feedback per request, aligned with `requests`; failures are values."""
        requests = list(requests)
        for i, r in enumerate(requests):
            if not isinstance(r, FeedbackRequest):
                raise ConfigError(f"requests[{i}] is a {type(r).__name__}; build an opd_sdk.FeedbackRequest")
        loop = asyncio.get_running_loop()
        if self._slots_loop is not loop:
            self._slots, self._slots_loop = asyncio.Semaphore(self.max_concurrency), loop
        pointwise = is_pointwise(self.teacher)
        units: list[FeedbackRequest] = []
        spans: list[tuple[int, int]] = []
        for r in requests:
            parts = [r.with_completions([c]) for c in r.completions] if pointwise and len(r.completions) > 1 else [r]
            spans.append((len(units), len(units) + len(parts)))
            units.extend(parts)
        keys = [self._cache_key(u) for u in units]
        bar = tqdm(total=len(units), desc="teacher feedback", disable=not self.progress, leave=False)
        try:
            futures = self._start(units, keys, loop)
            for f in futures:
                f.add_done_callback(lambda _f: bar.update(1))
            results = list(await asyncio.gather(*[asyncio.shield(f) for f in futures]))
        finally:
            bar.close()
        out = [results[a] if b - a == 1 else merge_pointwise(results[a:b]) for a, b in spans]
        self.usage.failures += sum(isinstance(f, FeedbackFailure) for f in out)
        self._summarise()
        return out

    def collect_sync(self, requests: Sequence[FeedbackRequest]) -> list[Feedback]:
        """Blocking `collect`, on the collector's own background event loop."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not None and running is self._sync_loop:
            raise ConfigError("collect_sync was called from the collector's own loop (inside a teacher?); "
                              "use `await collector.collect(...)` there")
        if self._sync_loop is None:
            self._sync_loop = asyncio.new_event_loop()
            self._sync_thread = threading.Thread(target=self._sync_loop.run_forever, name="opd-collector",
                                                 daemon=True)
            self._sync_thread.start()
        return asyncio.run_coroutine_threadsafe(self.collect(requests), self._sync_loop).result()

    def close(self) -> None:
        """Stop the background loop (if `collect_sync` started one); close the cache if
        the collector opened it (one passed in as a FeedbackCache stays open). Idempotent.

        Calls in flight get up to DRAIN_TIMEOUT_S to answer (their answers are cached: a
        resumed run does not pay for them again). Then a `Closeable` teacher's `aclose()` runs on the loop, then the loop's
        async generators are shut down (as `asyncio.run` does), which closes the teacher's
        HTTP clients made on this loop (`providers.client.Endpoint`), on this loop.
        """
        if self._sync_loop is not None:
            asyncio.run_coroutine_threadsafe(self._shutdown_loop(), self._sync_loop).result(30)
            self._sync_loop.call_soon_threadsafe(self._sync_loop.stop)
            if self._sync_thread is not None:
                self._sync_thread.join(10)
            self._sync_loop.close()
            self._sync_loop = None
        if self.cache is not None and self._owns_cache:
            self.cache.close()
            self._owns_cache = False

    async def _shutdown_loop(self) -> None:
        # calls already sent are paid for: let them answer (into the cache) before stopping
        tasks = [t for t in self._tasks if not t.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=min(self.timeout, DRAIN_TIMEOUT_S))
        if isinstance(self.teacher, Closeable):  # its own clients, made on this loop
            await self.teacher.aclose()
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.get_running_loop().shutdown_asyncgens()

    def __enter__(self) -> "FeedbackCollector":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _batch_mode(self, mode: str, discount: float, poll_s: tuple[float, float]) -> BatchMode | None:
        if mode not in ("online", "batch"):
            raise ConfigError(f"mode must be 'online' or 'batch' (the OpenAI Batch API), got {mode!r}")
        if mode == "online":
            return None
        if self.cache is None:
            raise ConfigError("mode='batch' needs a cache: answers land in it and pending batch ids are kept "
                              "beside it (pass cache='run/feedback_cache.sqlite')")
        BatchMode.check_teacher(self.teacher)
        return BatchMode(BatchLedger(f"{self.cache.path}.batches.json"), usage=self.usage,
                         prices=(self.price_prompt, self.price_completion), discount=discount, poll_s=poll_s,
                         max_retries=self.max_retries, budget_usd=self.budget_usd, progress=self.progress)

    # ----- scheduling --------------------------------------------------------
    def _cache_key(self, request: FeedbackRequest) -> str:
        if isinstance(self.teacher, CustomCacheKey):
            return self.teacher.cache_key(request)
        return request.canonical_json()

    def _api_calls(self, request: FeedbackRequest) -> int:
        return api_calls(self.teacher, request)

    def _start(self, units: list[FeedbackRequest], keys: list[str],
               loop: asyncio.AbstractEventLoop) -> list[asyncio.Future]:
        """A future per unit: joined in-flight, answered from cache, or newly started."""
        by_key: dict[str, asyncio.Future] = {}
        misses: list[tuple[str, FeedbackRequest]] = []
        futures = []
        for unit, key in zip(units, keys, strict=True):
            fut = by_key.get(key) or self._inflight.get(key)
            if fut is not None and fut.get_loop() is loop:
                self.usage.deduplicated += 1
                futures.append(fut)
                by_key[key] = fut
                continue
            fut = loop.create_future()
            by_key[key] = fut
            futures.append(fut)
            cached = self.cache.get(self.teacher.id, key) if self.cache is not None else None
            if cached is not None:
                self.usage.cache_hits += 1
                fut.set_result(cached)
                continue
            self._inflight[key] = fut
            misses.append((key, unit))
        if misses and (self.batch is not None or isinstance(self.teacher, BatchTeacher)):
            self._spawn(loop, self._resolve_batch(misses, [by_key[k] for k, _ in misses]))
        else:
            for key, unit in misses:
                self._spawn(loop, self._resolve_one(key, unit, by_key[key]))
        return futures

    def _spawn(self, loop: asyncio.AbstractEventLoop, coro: Any) -> None:
        task = loop.create_task(coro)
        self._tasks.add(task)  # a strong reference until it is done
        task.add_done_callback(self._tasks.discard)

    async def _resolve_one(self, key: str, unit: FeedbackRequest, fut: asyncio.Future) -> None:
        try:
            feedback = await self._call_with_retries(
                lambda: self.teacher.feedback(unit), [unit], self._api_calls(unit))
            result = feedback[0]
            self._store(key, result)
            fut.set_result(result)
        except Exception as exc:  # a teacher bug: every waiter re-raises it
            if not fut.done():
                fut.set_exception(exc)
        except BaseException as exc:  # cancellation: still resolve the waiters
            if not fut.done():
                fut.set_result(_unanswered(exc))
            raise
        finally:
            self._inflight.pop(key, None)

    async def _resolve_batch(self, misses: list[tuple[str, FeedbackRequest]], futs: list[asyncio.Future]) -> None:
        units = [u for _, u in misses]
        try:
            if self.batch is not None:  # mode="batch": the OpenAI Batch API
                results = await self.batch.collect(self.teacher, units)
            else:
                results = await self._call_with_retries(
                    lambda: self.teacher.feedback_batch(units), units, sum(self._api_calls(u) for u in units))
            for (key, _), fut, result in zip(misses, futs, results, strict=True):
                self._store(key, result)
                fut.set_result(result)
        except Exception as exc:  # a teacher bug: every waiter re-raises it
            for fut in futs:
                if not fut.done():
                    fut.set_exception(exc)
        except BaseException as exc:
            for fut in futs:
                if not fut.done():
                    fut.set_result(_unanswered(exc))
            raise
        finally:
            for key, _ in misses:
                self._inflight.pop(key, None)

    def _store(self, key: str, feedback: Feedback) -> None:
        if self.cache is not None and not isinstance(feedback, FeedbackFailure):
            self.cache.put(self.teacher.id, key, feedback)

    # ----- one call, with retries --------------------------------------------
    async def _call_with_retries(self, call: Any, units: list[FeedbackRequest], api_calls: int) -> list[Feedback]:
        """Answers for `units` (one call covers them all); errors become failures.

        The teacher's HTTP calls are counted, held to the budget and kept across the attempts
        in one `CallScope` (`opd_sdk.feedback.calls`): a retry re-sends only the calls that failed.
        """
        est_tokens = sum(estimate_tokens(u, self._api_calls(u)) for u in units)
        attempts = 0
        initial, maximum, cap = self._backoff
        calls = CallScope(self._ledger)
        try:
            async for attempt in retrying(self.max_retries, initial=initial, maximum=maximum, retry_after_cap=cap):
                with attempt:
                    assert self._slots is not None
                    async with self._slots:
                        await self.limiter.acquire(api_calls, est_tokens)
                        if self.auth_failure is not None:  # the key was refused: nothing more is sent
                            raise _AuthRefused()
                        if self._ledger.refuses():  # checked with the slot held
                            raise BudgetReached(f"budget of ${self.budget_usd:.4f} reached")
                        attempts += 1
                        self.usage.count_request(retry=attempts > 1)
                        calls.new_attempt()
                        with call_scope(calls):
                            results = await self._attempt(call, len(units), cap)
                        self._account(results, est_tokens, calls)  # before the slot is released
                    results = [check_shape(r, u) for r, u in zip(results, units, strict=True)]
        except BudgetReached:
            self.usage.budget_skipped += len(units)
            reason = (f"not sent: budget of ${self.budget_usd:.4f} reached "
                      f"(${self.usage.cost_usd:.4f} spent)")
            return [FeedbackFailure(reason=reason, error_type="budget", attempts=attempts, retriable=True)
                    for _ in units]
        except _AuthRefused:
            assert self.auth_failure is not None
            failure = self.auth_failure.model_copy(update={"attempts": attempts,
                                                           "reason": "not sent: " + self.auth_failure.reason})
            return [failure for _ in units]
        except TeacherError as exc:  # anything else is a bug and propagates
            failure = FeedbackFailure.from_error(exc, attempts)
            if isinstance(exc, AuthenticationFailed) and self.auth_failure is None:
                self.auth_failure = failure
            self._report(failure, attempts)
            return [failure for _ in units]
        return [r.model_copy(update={"attempts": max(r.attempts, attempts)}) if isinstance(r, FeedbackFailure)
                else r for r in results]

    def _report(self, failure: FeedbackFailure, attempts: int) -> None:
        """Log a request's final failure: the first of its kind (in the collector's life) in full;
        the others are counted and summarised in one line at the end of `collect`."""
        kind = (failure.error_type, failure.reason[:80])
        self._failed[kind] += 1
        if kind not in self._shown:
            self._shown.add(kind)
            self._failed[kind] -= 1  # shown in full
            log.warning("teacher %r (%s) failed after %d attempt(s) (%s): %s", self.teacher, self.teacher.id,
                        attempts, failure.error_type, failure.reason)

    def _summarise(self) -> None:
        for (kind, reason), more in self._failed.items():
            if more > 0:
                log.warning("teacher %r: %d more request(s) failed the same way (%s): %s...",
                            self.teacher, more, kind, reason)
        self._failed.clear()

    async def _attempt(self, call: Any, n_units: int, retry_after_cap: float) -> list[Any]:
        """One teacher call under the timeout; a 429's Retry-After pauses every call."""
        try:
            raw = await asyncio.wait_for(call(), self.timeout)
        except asyncio.TimeoutError as exc:
            raise TeacherTimeout(f"no answer within the collector's {self.timeout:g} s timeout") from exc
        except TeacherError as exc:
            log.debug("teacher %s attempt failed (%s): %s", self.teacher.id,
                      "will retry if attempts remain" if exc.retriable else "not retriable", redact(str(exc)))
            if isinstance(exc, RateLimited) and exc.retry_after:
                self.limiter.pause(min(exc.retry_after, retry_after_cap))
            raise
        results = [raw] if n_units == 1 and not isinstance(raw, list) else list(raw)
        if len(results) != n_units:
            raise BadResponse(f"feedback_batch returned {len(results)} answers for {n_units} requests",
                              retriable=False)
        return results

    def _account(self, results: list[Any], est_tokens: int, calls: CallScope) -> None:
        """Count a custom teacher's answers from their `Feedback.usage` (a teacher whose HTTP calls
        were metered, `calls.metered`, is already counted call by call); correct the TPM estimate."""
        actual = 0
        for r in results:
            if isinstance(r, FEEDBACK_CLASSES):  # not yet checked (`check_shape`): a teacher may return anything
                if not calls.metered:
                    self.usage.add_call_usage(r.usage, price_per_1k_prompt=self.price_prompt,
                                              price_per_1k_completion=self.price_completion)
                actual += r.usage.prompt_tokens + r.usage.completion_tokens
        if actual > 0:
            self.limiter.correct(est_tokens, actual)
