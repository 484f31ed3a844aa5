"""Retry policy for teacher calls: what to retry, and how long to wait.

Follows the openai-python client's policy (retry on connection errors,
timeouts, 408, 409, 429, 5xx; exponential backoff with jitter; honour
`retry-after-ms`, then `retry-after` as seconds or an HTTP date). Departs from
it in two ways: a server delay above the cap is clamped to the cap instead of
being ignored, and the decision reads only `TeacherError.retriable` and
`TeacherError.retry_after`, because providers translate their client's errors
into `TeacherError` at the adapter boundary.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from typing import Any, Mapping

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_base

from opd_sdk.constants import INITIAL_BACKOFF_S, MAX_BACKOFF_S, MAX_RETRY_AFTER_S
from opd_sdk.errors import TeacherError


def _finite_nonneg(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    if math.isnan(value) or value < 0:
        return None
    return value


def parse_retry_after(
    headers: Mapping[str, Any] | None,
    *,
    cap: float = MAX_RETRY_AFTER_S,
    now: float | None = None,
) -> float | None:
    """Seconds a server asked us to wait, clamped to [0, cap]; None if it did not say.

    Reads `retry-after-ms` (milliseconds) first, then `retry-after` as seconds
    (floats allowed) or as an HTTP date (a date in the past means 0). Header
    names are matched case-insensitively; unparsable or negative values are
    ignored. `now` (unix time) is for tests.
    """
    if not headers:
        return None
    lowered = {str(k).lower(): str(v).strip() for k, v in headers.items()}
    delay: float | None = None
    if "retry-after-ms" in lowered:
        ms = _finite_nonneg(lowered["retry-after-ms"])
        delay = None if ms is None else ms / 1000.0
    if delay is None and "retry-after" in lowered:
        text = lowered["retry-after"]
        delay = _finite_nonneg(text)
        if delay is None and text:
            try:
                when = email.utils.parsedate_to_datetime(text)
            except (TypeError, ValueError, IndexError, OverflowError):
                when = None
            if when is not None and when.tzinfo is not None:
                delay = max(0.0, when.timestamp() - (time.time() if now is None else now))
    if delay is None:
        return None
    return min(delay, cap)


def backoff_delay(retry_number: int, *, initial: float = INITIAL_BACKOFF_S, maximum: float = MAX_BACKOFF_S,
                  rng: random.Random | None = None) -> float:
    """Exponential backoff with "equal jitter" before retry `retry_number` (1-based).

    The ceiling is initial * 2**(n-1), capped at `maximum`; the delay is drawn
    uniformly from [ceiling/2, ceiling], so retries spread out but never
    collapse to zero.
    """
    ceiling = min(maximum, initial * (2 ** max(0, retry_number - 1)))
    draw = (rng or random).random()
    return ceiling / 2 + draw * ceiling / 2


def is_retriable(exc: BaseException) -> bool:
    return isinstance(exc, TeacherError) and exc.retriable


class ServerOrBackoffWait(wait_base):
    """tenacity wait: the server's requested delay if the error carried one,
    else exponential backoff with jitter."""

    def __init__(self, initial: float = INITIAL_BACKOFF_S, maximum: float = MAX_BACKOFF_S,
                 retry_after_cap: float = MAX_RETRY_AFTER_S) -> None:
        self.initial = initial
        self.maximum = maximum
        self.retry_after_cap = retry_after_cap

    def __call__(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        server = getattr(exc, "retry_after", None) if isinstance(exc, TeacherError) else None
        if server is not None:
            return min(max(0.0, float(server)), self.retry_after_cap)
        return backoff_delay(retry_state.attempt_number, initial=self.initial, maximum=self.maximum)


def retrying(max_retries: int, *, initial: float = INITIAL_BACKOFF_S, maximum: float = MAX_BACKOFF_S,
             retry_after_cap: float = MAX_RETRY_AFTER_S) -> AsyncRetrying:
    """The collector's tenacity policy: up to `max_retries` retries after the
    first attempt, only for retriable `TeacherError`s; the last error is
    re-raised (not wrapped in tenacity's RetryError)."""
    return AsyncRetrying(
        stop=stop_after_attempt(max_retries + 1),
        retry=retry_if_exception(is_retriable),
        wait=ServerOrBackoffWait(initial, maximum, retry_after_cap),
        reraise=True,
    )
