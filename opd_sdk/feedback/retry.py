"""Retry policy for teacher calls: what to retry, and how long to wait.

Follows the openai-python client's policy (retry on connection errors,
timeouts, 408, 409, 429, 5xx; exponential backoff with jitter; honour
`retry-after-ms`, then `retry-after` as seconds or an HTTP date, then the
delay headers proxies use). Departs from it in three ways: a server delay
above the cap is clamped to the cap instead of being ignored, a delay of 0
(or in the past) falls back to the backoff instead of retrying at once, and the decision reads only `TeacherError.retriable` and
`TeacherError.retry_after`, because providers translate their client's errors
into `TeacherError` at the adapter boundary.
"""

from __future__ import annotations

import email.utils
import math
import random
import re
import time
from typing import Any, Mapping

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
)
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


_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?"
                       r"(?:(\d+(?:\.\d+)?)ms)?$")
# proxies' names for the server's delay, read after retry-after-ms and retry-after
PROXY_DELAY_HEADERS = ("llm_provider-retry-after", "x-litellm-retry-after")
RESET_HEADERS = ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens", "x-ratelimit-reset")


def parse_duration(text: str) -> float | None:
    """Seconds in a duration: "2", "0.5", "1s", "20ms", "6m0s", "1h2m3.5s" (None if unparsable)."""
    text = text.strip().lower()
    plain = _finite_nonneg(text)
    if plain is not None:
        return plain
    match = _DURATION.match(text)
    if not text or match is None or not any(match.groups()):
        return None
    h, m, sec, ms = (float(g) if g else 0.0 for g in match.groups())
    return h * 3600 + m * 60 + sec + ms / 1000


def _seconds_or_date(text: str, now: float | None) -> float | None:
    delay = _finite_nonneg(text)
    if delay is None and text:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            when = None
        if when is not None and when.tzinfo is not None:
            delay = when.timestamp() - (time.time() if now is None else now)
    return delay


def parse_retry_after(
    headers: Mapping[str, Any] | None,
    *,
    cap: float = MAX_RETRY_AFTER_S,
    now: float | None = None,
) -> float | None:
    """Seconds a server asked us to wait, clamped to (0, cap]; None if it did not say.

    Reads, first found wins: `retry-after-ms` (milliseconds); `retry-after` as
    seconds (floats allowed) or an HTTP date; the proxies' `llm_provider-retry-after`
    (LiteLLM); then `x-ratelimit-reset-requests` / `-tokens` durations such as "1s",
    "20ms" or "6m0s" (the longer of the two). A delay of 0, a negative one, a date
    in the past or an unparsable value means "no server delay": None, so the caller
    uses its exponential backoff, never an immediate retry. Header names are matched
    case-insensitively; `now` (unix time) is for tests.
    """
    if not headers:
        return None
    lowered = {str(k).lower(): str(v).strip() for k, v in headers.items()}
    delay: float | None = None
    if "retry-after-ms" in lowered:
        ms = _finite_nonneg(lowered["retry-after-ms"])
        delay = None if ms is None else ms / 1000.0
    for name in ("retry-after", *PROXY_DELAY_HEADERS):
        if (delay is None or delay <= 0) and name in lowered:
            delay = _seconds_or_date(lowered[name], now)
    if delay is None or delay <= 0:
        resets = [parse_duration(lowered[h]) for h in RESET_HEADERS if h in lowered]
        resets = [r for r in resets if r is not None and r > 0]
        delay = max(resets) if resets else None
    if delay is None or not delay > 0:
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
        server = exc.retry_after if isinstance(exc, TeacherError) else None
        if server is not None and server > 0:  # 0 or less: no server delay, back off
            return min(float(server), self.retry_after_cap)
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
