"""Retry-After parsing (table), backoff bounds, the tenacity policy, and openai error translation."""

from __future__ import annotations

import asyncio
import random

import openai
import pytest

from opd_sdk.errors import TeacherError
from opd_sdk.feedback.retry import backoff_delay, parse_retry_after, retrying
from providers.openai_errors import translate_openai_error
from tests.scripted_server import Fault, ScriptedServer

NOW = 1445412470.0  # = Wed, 21 Oct 2015 07:27:50 GMT

RETRY_AFTER_CASES = [
    # (headers, expected seconds)
    (None, None),
    ({}, None),
    ({"retry-after": "2"}, 2.0),
    ({"Retry-After": "2"}, 2.0),  # header names are case-insensitive
    ({"retry-after": "0.5"}, 0.5),  # non-standard float seconds
    ({"retry-after": " 3 "}, 3.0),
    ({"retry-after": "0"}, None),  # 0 means "no server delay": the backoff applies (issue 14 s2; was 0.0)
    ({"retry-after-ms": "1500"}, 1.5),
    ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),  # ms wins
    ({"retry-after-ms": "junk", "retry-after": "9"}, 9.0),  # bad ms falls back
    ({"retry-after-ms": "-5", "retry-after": "4"}, 4.0),
    ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 10.0),  # HTTP date, 10 s after NOW
    ({"retry-after": "Wed, 21 Oct 2015 07:27:00 GMT"}, None),  # a date in the past: backoff (was 0.0)
    ({"retry-after": "Wed, 21 Oct 2015 09:27:50 GMT"}, 60.0),  # 2 h away: capped
    ({"retry-after": "3600"}, 60.0),  # capped at MAX_RETRY_AFTER_S
    ({"retry-after-ms": "inf"}, 60.0),  # "forever" is clamped to the cap
    ({"retry-after": "nan"}, None),
    ({"retry-after": "-1"}, None),
    ({"retry-after": "soon"}, None),
    ({"retry-after": ""}, None),
    ({"x-other": "5"}, None),
    ({"retry-after": "-3"}, None),
    ({"retry-after-ms": "0"}, None),
    ({"retry-after-ms": "0", "retry-after": "2"}, 2.0),  # a useless ms value does not hide a real one
    # delays proxies send (LiteLLM; OpenAI-style reset durations)
    ({"llm_provider-retry-after": "7"}, 7.0),
    ({"LLM_PROVIDER-Retry-After": "1.5"}, 1.5),
    ({"x-ratelimit-reset-requests": "1s"}, 1.0),
    ({"x-ratelimit-reset-tokens": "6m0s"}, 60.0),  # 360 s, capped
    ({"x-ratelimit-reset-tokens": "20ms"}, 0.02),
    ({"x-ratelimit-reset-requests": "1m30.5s"}, 60.0),
    ({"x-ratelimit-reset-requests": "2s", "x-ratelimit-reset-tokens": "12.5s"}, 12.5),  # the longer
    ({"x-ratelimit-reset-requests": "0s"}, None),
    ({"x-ratelimit-reset-requests": "soon"}, None),
    ({"retry-after": "0", "x-ratelimit-reset-requests": "3s"}, 3.0),
]


@pytest.mark.parametrize("headers,expected", RETRY_AFTER_CASES)
def test_parse_retry_after(headers, expected):
    assert parse_retry_after(headers, now=NOW) == expected


def test_parse_retry_after_custom_cap():
    assert parse_retry_after({"retry-after": "30"}, cap=5.0) == 5.0


def test_backoff_is_exponential_with_bounded_jitter():
    rng = random.Random(0)
    for n, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (9, 8.0)]:
        draws = [backoff_delay(n, initial=0.5, maximum=8.0, rng=rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in draws)
        assert max(draws) - min(draws) > ceiling / 4  # there is jitter


async def test_policy_retries_only_retriable_errors_and_honours_server_delay():
    calls = []

    async def run(errors):
        calls.clear()
        async for attempt in retrying(3, initial=0.001, maximum=0.002):
            with attempt:
                calls.append(asyncio.get_running_loop().time())
                if len(calls) <= len(errors):
                    raise errors[len(calls) - 1]
        return len(calls)

    assert await run([TeacherError("x", retriable=True)] * 2) == 3
    with pytest.raises(TeacherError, match="fatal"):
        await run([TeacherError("fatal", retriable=False)])
    assert len(calls) == 1
    with pytest.raises(TeacherError, match="again"):
        await run([TeacherError("again", retriable=True)] * 4)  # 1 + 3 retries, then the error itself
    assert len(calls) == 4
    await run([TeacherError("slow down", retriable=True, retry_after=0.2)])
    assert calls[1] - calls[0] >= 0.19


@pytest.mark.parametrize("fault,retriable,status,retry_after,kind", [
    (Fault.rate_limit(retry_after="1"), True, 429, 1.0, "rate_limited"),
    (Fault.rate_limit(retry_after_ms="20"), True, 429, 0.02, "rate_limited"),
    (Fault.status(500), True, 500, None, "server_error"),
    (Fault.status(503, retry_after="2"), True, 503, 2.0, "server_error"),
    (Fault.status(408), True, 408, None, "server_error"),
    (Fault.status(409), True, 409, None, "server_error"),
    (Fault.status(400), False, 400, None, "client_error"),
    (Fault.status(401), False, 401, None, "auth"),
    (Fault.status(403), False, 403, None, "auth"),
    (Fault.status(404), False, 404, None, "client_error"),
    (Fault.status(422), False, 422, None, "client_error"),
    (Fault.drop(), True, None, None, "connection"),
    (Fault.malformed(), True, None, None, "bad_response"),
    (Fault.hang(2.0), True, None, None, "timeout"),
])
def test_translate_real_openai_errors(fault, retriable, status, retry_after, kind):
    key = "sk-test-TRANSLATE-abcdef123456"
    with ScriptedServer(faults=[fault]) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key=key, max_retries=0, timeout=0.3)
        with pytest.raises(Exception) as info:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        client.close()
    err = translate_openai_error(info.value, secrets=[key])
    assert (err.retriable, err.status, err.retry_after, err.error_type) == (retriable, status, retry_after, kind)
    assert key not in str(err)


def test_translate_redacts_a_key_the_server_echoes():
    key = "sk-proj-ECHOED-0123456789"
    fault = Fault.status(401, message=f"Incorrect API key provided: {key}. Find your key at ...")
    with ScriptedServer(faults=[fault]) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        client.close()
    err = translate_openai_error(info.value)  # caught by pattern even when the key is not passed
    assert key not in str(err) and "HTTP 401" in str(err) and not err.retriable


@pytest.mark.parametrize("error, kind, retriable, status", [
    ({"message": "Rate limit reached", "code": "rate_limit_exceeded"}, "rate_limited", True, None),
    ({"message": "slow down", "code": 429}, "rate_limited", True, 429),
    ({"message": "upstream failed", "code": "502"}, "server_error", True, 502),
    ({"message": "The server is overloaded", "type": "overloaded_error"}, "server_error", True, None),
    ({"message": "Invalid model", "code": "invalid_request_error"}, "client_error", False, None),
    ({"message": "auth", "code": 401}, "auth", False, 401),
    ("plain text error", "client_error", False, None),
    ({"message": "You exceeded your current quota", "code": "insufficient_quota"}, "client_error", False, None),
    ({"message": "upstream timed out", "code": "timeout"}, "timeout", True, None),
])


def test_error_objects_in_a_200_are_typed_by_their_code(error, kind, retriable, status):
    from providers.openai_errors import error_from_body

    err = error_from_body(error)
    assert (err.error_type, err.retriable, err.status) == (kind, retriable, status)
    assert "provider error in a 200 reply" in str(err)


def test_a_429_for_insufficient_quota_is_not_retried():
    """OpenAI answers 429 with code insufficient_quota when the account has no credit left."""
    fault = Fault.status(429, message="You exceeded your current quota")
    with ScriptedServer(faults=[fault]) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="sk-test-quota-0000", max_retries=0)
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        client.close()
    plain = translate_openai_error(info.value)
    assert plain.error_type == "rate_limited"  # the scripted body has no code: an ordinary 429
    info.value.body["code"] = "insufficient_quota"
    quota = translate_openai_error(info.value)
    assert (quota.error_type, quota.retriable, quota.status) == ("client_error", False, 429)
