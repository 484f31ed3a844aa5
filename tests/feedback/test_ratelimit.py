"""Token buckets: the window guarantee, token correction, and the 429 pause."""

from __future__ import annotations

import random
import time

import pytest

from opd_sdk.errors import ConfigError
from opd_sdk.feedback.ratelimit import RateLimiter, TokenBucket, estimate_tokens
from opd_sdk.types import Completion, FeedbackRequest


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def admit_all(bucket: TokenBucket, clock: FakeClock, requests: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Feed (arrival gap, amount) requests; return (admission time, amount)."""
    admitted = []
    for gap, amount in requests:
        clock.t += gap
        admitted.append((clock.t + bucket.reserve(amount), amount))
    return admitted


def test_bucket_never_exceeds_its_rate_over_any_window():
    clock, rng = FakeClock(), random.Random(0)
    rate, capacity = 5.0, 3.0
    bucket = TokenBucket(rate, capacity, clock=clock)
    # bursts of arrivals and idle gaps, amounts 1..4 (some above the capacity)
    requests = [(rng.choice([0.0, 0.0, 0.01, 0.3, 2.0]), float(rng.randint(1, 4))) for _ in range(400)]
    admitted = sorted(admit_all(bucket, clock, requests))
    times = [t for t, _ in admitted]
    amounts = [a for _, a in admitted]
    for i in range(len(times)):
        total = 0.0
        for j in range(i, len(times)):
            total += amounts[j]
            # everything admitted within [times[i], times[j]] fits burst + rate * width, where
            # burst is the capacity, or the largest single amount when that is larger
            assert total <= max(capacity, max(amounts)) + rate * (times[j] - times[i]) + 1e-9


def test_bucket_worked_example():
    clock = FakeClock()
    bucket = TokenBucket(rate=2.0, capacity=2.0, clock=clock)  # 2 tokens a second, burst 2
    assert bucket.reserve(1) == 0.0
    assert bucket.reserve(1) == 0.0
    assert bucket.reserve(1) == pytest.approx(0.5)  # level -1: wait 1/2 s
    assert bucket.reserve(1) == pytest.approx(1.0)  # level -2: wait 1 s (served in order)
    clock.t += 1.0  # refilled 2 -> level 0
    assert bucket.reserve(1) == pytest.approx(0.5)
    assert bucket.reserve(5) == pytest.approx(3.0)  # large calls are charged in full


def test_correction_charges_and_refunds():
    clock = FakeClock()
    bucket = TokenBucket(rate=10.0, capacity=10.0, clock=clock)
    assert bucket.reserve(10) == 0.0  # estimate 10
    bucket.correct(+20)  # the call really used 30: level -20
    assert bucket.reserve(1) == pytest.approx(2.1)
    clock.t += 10.0  # full again
    bucket.reserve(10)
    bucket.correct(-10)  # used nothing: refunded
    assert bucket.reserve(10) == 0.0


async def test_limiter_pause_holds_new_calls():
    limiter = RateLimiter(rpm=None, tpm=None)
    started = time.monotonic()
    await limiter.acquire(1, 10)  # no limits, no pause: immediate
    assert time.monotonic() - started < 0.05
    limiter.pause(0.2)
    limiter.pause(0.1)  # a shorter pause does not cut a longer one short
    await limiter.acquire(1, 10)
    assert time.monotonic() - started >= 0.19


def test_limiter_rejects_bad_limits():
    with pytest.raises(ConfigError, match="rpm must be a positive number"):
        RateLimiter(rpm=0)
    with pytest.raises(ConfigError, match="tpm"):
        RateLimiter(tpm=-5)


def test_estimate_tokens_from_text_length():
    request = FeedbackRequest(prompt="a" * 40, privileged="b" * 8, completions=[Completion(text="c" * 12)])
    assert estimate_tokens(request) == 15  # 60 chars / 4
    assert estimate_tokens(request, api_calls=3) == 45
