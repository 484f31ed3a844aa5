"""Request-rate and token-rate limits: token buckets shared by all calls of
one collector.

A bucket holds up to `capacity` tokens and refills at `rate` tokens a second.
It is a reservation scheduler (the generic cell rate algorithm): a caller
takes its tokens at once, driving the level negative if it must, and sleeps
until its reservation is covered. Callers are thereby served in arrival
order, no lock is held across an `await`, and the bucket works from any
event loop or thread. Guarantee: over any window of length w, at most
`B + rate * w` tokens are admitted, where B is the capacity (or the largest
single amount, if one call asks for more than the capacity).

Token counts for a TPM limit are estimated before a call from text length
(`CHARS_PER_TOKEN`) and corrected afterwards from the usage the teacher
reported (`correct`): a call that used more takes the difference out of the
bucket (delaying later calls), one that used less gives it back.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from typing import Callable

from opd_sdk.constants import CHARS_PER_TOKEN
from opd_sdk.errors import ConfigError
from opd_sdk.types import FeedbackRequest


class TokenBucket:
    """`rate` tokens a second, bursts up to `capacity`."""

    def __init__(self, rate: float, capacity: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ConfigError(f"rate limit must be a positive number, got {rate!r}")
        if not capacity >= 1:
            raise ConfigError(f"bucket capacity must be at least 1, got {capacity!r}")
        self.rate = float(rate)
        self.capacity = float(capacity)
        self._clock = clock
        self._level = float(capacity)
        self._stamp = clock()
        self._mutex = threading.Lock()

    def _refill(self, now: float) -> None:
        self._level = min(self.capacity, self._level + (now - self._stamp) * self.rate)
        self._stamp = now

    def reserve(self, amount: float) -> float:
        """Take `amount` tokens now; return how many seconds to wait before using them.

        An amount above the capacity simply waits longer (the level goes that
        far below zero), so a large call is charged in full.
        """
        amount = float(amount)
        with self._mutex:
            now = self._clock()
            self._refill(now)
            self._level -= amount
            return 0.0 if self._level >= 0 else -self._level / self.rate

    async def acquire(self, amount: float = 1.0) -> None:
        wait = self.reserve(amount)
        if wait > 0:
            await asyncio.sleep(wait)

    def correct(self, delta: float) -> None:
        """Charge `delta` more tokens (or refund, if negative) after the fact."""
        with self._mutex:
            self._refill(self._clock())
            self._level = min(self.capacity, self._level - delta)


def estimate_tokens(request: FeedbackRequest, api_calls: int = 1) -> int:
    """Rough prompt size of the calls one request makes: all its text / CHARS_PER_TOKEN,
    once per API call."""
    chars = len(request.prompt_text()) + len(request.privileged or "")
    chars += sum(len(c.text) for c in request.completions)
    return max(1, api_calls) * max(1, math.ceil(chars / CHARS_PER_TOKEN))


class RateLimiter:
    """RPM and TPM buckets (each optional) plus a shared pause after a 429.

    Bursts are small, so traffic stays smooth rather than spending a whole
    minute's quota at once (providers enforce limits over short windows):
    the request bucket holds a tenth of a second's worth (at least 1), the
    token bucket one second's worth (at least 1).
    """

    def __init__(self, rpm: float | None = None, tpm: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        for name, value in (("rpm", rpm), ("tpm", tpm)):
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be a positive number or None (no limit), got {value!r}")
        self._clock = clock
        self.requests = TokenBucket(rpm / 60.0, max(1.0, rpm / 600.0), clock=clock) if rpm else None
        self.tokens = TokenBucket(tpm / 60.0, max(1.0, tpm / 60.0), clock=clock) if tpm else None
        self._paused_until = 0.0

    async def acquire(self, calls: int, tokens: int) -> None:
        """Wait until `calls` requests and `tokens` tokens may be sent."""
        waits = [0.0, self._paused_until - self._clock()]
        if self.requests is not None:
            waits.append(self.requests.reserve(calls))
        if self.tokens is not None:
            waits.append(self.tokens.reserve(tokens))
        wait = max(waits)
        if wait > 0:
            await asyncio.sleep(wait)

    def correct(self, estimated_tokens: int, actual_tokens: int) -> None:
        if self.tokens is not None:
            self.tokens.correct(actual_tokens - estimated_tokens)

    def pause(self, seconds: float) -> None:
        """Hold every new call for `seconds` (a server said 429, retry after)."""
        self._paused_until = max(self._paused_until, self._clock() + seconds)
