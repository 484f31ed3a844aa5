"""Third-party fault server tier (issue 14, section 5): the collector and JudgeTeacher against
LLMock (`pip install llmock`), a chaos / mock OpenAI server we did not write, which also grades
the client's retry behaviour (`assert_resilient`: Retry-After honoured, no retry of a 400, backoff,
no retry storm). Skipped when llmock is not installed.

    pip install llmock && python -m pytest -q tests/feedback/test_collector_llmock.py
"""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("llmock")

from opd_sdk import FeedbackCollector, FeedbackFailure, Score  # noqa: E402
from providers import JudgeTeacher  # noqa: E402
from tests.providers.helpers import request  # noqa: E402

FAST = dict(backoff_initial_s=0.05, backoff_max_s=0.2)


def judge(llmock, **kw) -> JudgeTeacher:
    return JudgeTeacher("gpt-4o-mini", base_url=llmock.base_url("openai"), api_key="llmock-test-key",
                        structured="none", **kw)


async def collect(teacher, reqs, **kw):
    with FeedbackCollector(teacher, progress=False, **kw) as col:
        return await col.collect(reqs)


async def test_rate_limit_with_retry_after_is_waited_out(llmock):
    llmock.reply(json.dumps({"score": 7}), times=None).rate_limit(times=2, retry_after=0.3)
    started = time.monotonic()
    [fb] = await collect(judge(llmock), [request()], **FAST)
    assert isinstance(fb, Score) and fb.scores == [pytest.approx(0.7)]
    assert time.monotonic() - started >= 0.55  # two waits of Retry-After 0.3 s
    assert len(llmock.requests) == 3
    llmock.assert_resilient(strict=True)


async def test_server_errors_are_retried_with_backoff(llmock):
    llmock.reply(json.dumps({"score": 4}), times=None).fail(503, times=3)
    [fb] = await collect(judge(llmock), [request()], **FAST)
    assert isinstance(fb, Score) and fb.scores == [pytest.approx(0.4)] and len(llmock.requests) == 4
    llmock.assert_resilient(strict=True)


async def test_an_outage_gives_up_with_a_typed_failure_not_a_zero(llmock):
    llmock.outage(status=503)
    [fb] = await collect(judge(llmock), [request()], max_retries=2, **FAST)
    assert isinstance(fb, FeedbackFailure)
    assert (fb.error_type, fb.status, fb.retriable, fb.attempts) == ("server_error", 503, True, 3)
    llmock.assert_resilient()


async def test_a_400_is_not_retried(llmock):
    llmock.fail(400, message="bad request: unknown field", times=None)
    [fb] = await collect(judge(llmock), [request()], **FAST)
    assert isinstance(fb, FeedbackFailure)
    assert (fb.error_type, fb.status, fb.attempts, len(llmock.requests)) == ("client_error", 400, 1, 1)
    llmock.assert_resilient(strict=True)


async def test_context_overflow_on_one_completion_spares_the_others(llmock):
    llmock.reply(json.dumps({"score": 6}), times=None).context_overflow(times=1)
    [fb] = await collect(judge(llmock, max_tokens=50), [request(texts=("a", "b", "c"))],
                         max_concurrency=1, **FAST)
    assert isinstance(fb, Score) and sorted(fb.valid()) == [False, True, True]
    assert [s for s, ok in zip(fb.scores, fb.valid()) if ok] == [pytest.approx(0.6)] * 2
    assert len(llmock.requests) == 3  # the overflowing one was not retried, the others not sunk


async def test_a_slow_answer_times_out_and_is_retried(llmock):
    llmock.reply(json.dumps({"score": 9}), times=None).delay(2.0, times=1)
    [fb] = await collect(judge(llmock), [request()], timeout=0.5, **FAST)
    assert isinstance(fb, Score) and fb.scores == [pytest.approx(0.9)] and len(llmock.requests) == 2


async def test_real_rpm_quota_is_respected(llmock):
    llmock.reply(json.dumps({"score": 5}), times=None).limits(rpm=600)
    reqs = [request(prompt=f"q{i}") for i in range(8)]
    results = await collect(judge(llmock), reqs, rpm=600, max_concurrency=4, **FAST)
    assert all(isinstance(r, Score) and r.scores == [0.5] for r in results)
    assert len(llmock.requests) == 8  # the client-side limit kept every call under the server's quota
    llmock.assert_resilient(strict=True)
