"""Issue 14, section 2, through the collector and the real openai client: what servers and
proxies send when they limit or fail, and how many calls it costs."""

from __future__ import annotations

import json
import time

import pytest

from opd_sdk import FeedbackCollector, FeedbackFailure, Score
from providers import JudgeTeacher, LogprobTeacher
from tests.providers.helpers import request
from tests.scripted_server import Fault, ScriptedServer

SCORE_5 = json.dumps({"score": 5})


def judge(srv) -> JudgeTeacher:
    return JudgeTeacher("m", base_url=srv.base_url, api_key="sk-test-faults-0000")


async def collect_one(teacher, **kw):
    with FeedbackCollector(teacher, progress=False, **kw) as col:
        started = time.monotonic()
        [result] = await col.collect([request()])
        return result, time.monotonic() - started


@pytest.mark.parametrize("retry_after", ["0", "-1", "Wed, 21 Oct 2015 07:28:00 GMT"])
async def test_retry_after_zero_negative_or_past_uses_the_backoff(retry_after):
    faults = [Fault.rate_limit(retry_after=retry_after)] * 4
    with ScriptedServer(lambda body: SCORE_5, faults=faults) as srv:
        result, elapsed = await collect_one(judge(srv), backoff_initial_s=0.04, backoff_max_s=1.0)
        times = srv.arrival_times()
    assert isinstance(result, Score) and result.scores == [0.5] and srv.count == 5
    gaps = [b - a for a, b in zip(times, times[1:])]
    # equal-jitter backoff: retry n waits at least 0.04 * 2**(n-1) / 2 (before the fix: ~0 s each)
    assert all(g >= 0.02 * 2 ** n - 0.005 for n, g in enumerate(gaps)), gaps
    assert elapsed >= 0.3


@pytest.mark.parametrize("headers, wait", [
    ({"llm_provider-retry-after": "0.4"}, 0.4),
    ({"x-ratelimit-reset-requests": "400ms"}, 0.4),
    ({"x-ratelimit-reset-tokens": "0.4s", "x-ratelimit-reset-requests": "1ms"}, 0.4),
])
async def test_proxy_delay_headers_are_honoured(headers, wait):
    with ScriptedServer(lambda body: SCORE_5, faults=[Fault.headers_status(429, headers)]) as srv:
        result, _ = await collect_one(judge(srv), backoff_initial_s=0.001, backoff_max_s=0.002)
        times = srv.arrival_times()
    assert isinstance(result, Score) and srv.count == 2
    assert times[1] - times[0] >= wait - 0.01


async def test_proxy_delay_is_capped():
    with ScriptedServer(lambda body: SCORE_5,
                        faults=[Fault.headers_status(429, {"x-ratelimit-reset-requests": "6m0s"})]) as srv:
        result, elapsed = await collect_one(judge(srv), retry_after_cap_s=0.2)
    assert isinstance(result, Score) and 0.19 <= elapsed < 5


async def test_a_200_with_a_retriable_error_body_is_retried_and_its_message_kept():
    faults = [Fault.error_in_200("Rate limit reached for requests", code="rate_limit_exceeded"),
              Fault.error_in_200("The server is overloaded", code=503)]
    with ScriptedServer(lambda body: SCORE_5, faults=faults) as srv:
        result, _ = await collect_one(judge(srv), backoff_initial_s=0.01, backoff_max_s=0.02)
    assert isinstance(result, Score) and result.scores == [0.5] and srv.count == 3
    with ScriptedServer(lambda body: SCORE_5, faults=[Fault.error_in_200("Rate limit reached", code=429)] * 9) as srv:
        result, _ = await collect_one(judge(srv), max_retries=2, backoff_initial_s=0.01, backoff_max_s=0.02)
    assert isinstance(result, FeedbackFailure)
    assert (result.error_type, result.retriable, result.attempts, result.status) == ("rate_limited", True, 3, 429)
    assert "Rate limit reached" in result.reason  # the provider's message survives (was: a TypeError)


async def test_a_200_with_a_non_retriable_error_body_fails_once():
    faults = [Fault.error_in_200("Invalid model name 'm'", code="invalid_request_error")] * 9
    with ScriptedServer(lambda body: SCORE_5, faults=faults) as srv:
        result, _ = await collect_one(judge(srv), backoff_initial_s=0.01)
    assert isinstance(result, FeedbackFailure)
    assert (result.error_type, result.retriable, result.attempts, srv.count) == ("client_error", False, 1, 1)
    assert "Invalid model name" in result.reason


def plain_completion(body: dict) -> dict:  # a server without echo log-probs
    return {"id": "c", "object": "text_completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "text": "x", "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}


@pytest.mark.parametrize("fault", [
    None,  # 200 without logprobs
    Fault.status(400, message="echo is not supported with this model"),
    Fault.status(500, message="Internal error: prompt_logprobs not implemented"),
    Fault.status(422, message="logprobs: extra inputs are not permitted"),
])
async def test_a_server_without_echo_logprobs_fails_fast_once(fault):
    with ScriptedServer(plain_completion, faults=(lambda i, body: fault)) as srv:
        teacher = LogprobTeacher("m", base_url=srv.base_url, api_key="sk-test-echo-0000")
        reqs = [request(prompt=f"q{i}", texts=("ab", "cd")) for i in range(3)]
        with FeedbackCollector(teacher, progress=False, backoff_initial_s=0.01) as col:
            results = await col.collect(reqs)
        again = await FeedbackCollector(teacher, progress=False).collect(reqs[:1])
    assert all(isinstance(r, FeedbackFailure) for r in results + again)
    assert {(r.error_type, r.retriable) for r in results + again} == {("unsupported", False)}
    assert all(("echo" in r.reason) or ("logprobs" in r.reason) for r in results)
    assert srv.count == 1  # asked once; every other call failed at once, unsent
