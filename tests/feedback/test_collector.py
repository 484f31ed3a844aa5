"""FeedbackCollector against the scripted server, through the real openai client."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import pytest

from opd_sdk import (
    Completion,
    FeedbackCollector,
    FeedbackFailure,
    FeedbackRequest,
    Score,
)
from tests.minimal_judge import MinimalJudge, answer_of
from tests.scripted_server import Fault, ScriptedServer

FAST = dict(backoff_initial_s=0.01, backoff_max_s=0.05)


def score_reply(body: dict) -> str:
    """The scripted judge: score = length of the answer mod 10."""
    return f"Score: {len(answer_of(body)) % 10}"


def make_requests(n: int, start: int = 0) -> list[FeedbackRequest]:
    return [FeedbackRequest(prompt=f"question {i}", completions=[Completion(text="x" * (i % 7) + f"#{i}")])
            for i in range(start, start + n)]


def expected_score(request: FeedbackRequest) -> list[float]:
    return [float(len(c.text) % 10) for c in request.completions]


def first_attempt_fails(faults: list[Fault]):
    """Fault script: the first request for each distinct answer gets the next fault in turn."""
    seen: set[str] = set()

    def script(index: int, body: dict) -> Fault | None:
        answer = answer_of(body)
        if answer in seen:
            return None
        seen.add(answer)
        return faults[len(seen) % len(faults)]

    return script


@pytest.fixture
def server():
    with ScriptedServer(score_reply) as srv:
        yield srv


async def test_all_succeed_under_transient_faults(server):
    server.faults = first_attempt_fails([
        Fault.rate_limit(retry_after_ms="10"), Fault.status(500), Fault.status(503), Fault.drop(),
        Fault.malformed(), Fault.status(408), Fault.status(409)])
    requests = make_requests(40)
    collector = FeedbackCollector(MinimalJudge(server.base_url), max_concurrency=8, **FAST)
    results = await collector.collect(requests)
    assert [r.scores for r in results] == [expected_score(q) for q in requests]
    assert server.count == 80  # every request failed once, then succeeded
    assert collector.usage.requests_sent == 80 and collector.usage.retries == 40
    assert collector.usage.failures == 0
    faults_seen = {r.fault for r in server.requests}
    assert faults_seen == {"ok", "http_429", "http_500", "http_503", "drop", "malformed", "http_408", "http_409"}


async def test_malformed_and_dropped_replies_are_retried(server):
    server.faults = [Fault.malformed(), Fault.drop(), None]
    collector = FeedbackCollector(MinimalJudge(server.base_url), **FAST)
    [result] = await collector.collect(make_requests(1))
    assert isinstance(result, Score) and result.scores == [2.0]  # "#0" has length 2
    assert server.count == 3 and collector.usage.retries == 2


async def test_non_retriable_4xx_fails_at_once(server):
    server.faults = lambda i, body: Fault.status(400, message="bad field 'temperature'")
    collector = FeedbackCollector(MinimalJudge(server.base_url), **FAST)
    [result] = await collector.collect(make_requests(1))
    assert isinstance(result, FeedbackFailure)
    assert result.attempts == 1 and not result.retriable
    assert (result.error_type, result.status) == ("client_error", 400)
    assert "bad field" in result.reason
    assert server.count == 1 and collector.usage.failures == 1


async def test_retries_exhausted_gives_failure_with_attempts(server):
    server.faults = lambda i, body: Fault.status(503)
    collector = FeedbackCollector(MinimalJudge(server.base_url), max_retries=3, **FAST)
    [result] = await collector.collect(make_requests(1))
    assert isinstance(result, FeedbackFailure)
    assert (result.attempts, result.retriable, result.error_type) == (4, True, "server_error")
    assert server.count == 4


async def test_timeout_gives_timeout_failure(server):
    server.faults = lambda i, body: Fault.hang(5.0)
    collector = FeedbackCollector(MinimalJudge(server.base_url), timeout=0.2, max_retries=1, **FAST)
    [result] = await collector.collect(make_requests(1))
    assert isinstance(result, FeedbackFailure)
    assert (result.error_type, result.attempts, result.retriable) == ("timeout", 2, True)
    assert server.count == 2


async def test_one_bad_request_does_not_sink_the_batch(server):
    requests = make_requests(6)
    bad = requests[3].completions[0].text
    server.faults = lambda i, body: Fault.status(422) if answer_of(body) == bad else None
    collector = FeedbackCollector(MinimalJudge(server.base_url), **FAST)
    results = await collector.collect(requests)
    assert [isinstance(r, FeedbackFailure) for r in results] == [False, False, False, True, False, False]
    assert [r.scores for i, r in enumerate(results) if i != 3] == [expected_score(q) for i, q in
                                                                    enumerate(requests) if i != 3]


async def test_retry_after_is_honoured(server):
    server.faults = [Fault.rate_limit(retry_after_ms="300")]
    collector = FeedbackCollector(MinimalJudge(server.base_url), **FAST)
    [result] = await collector.collect(make_requests(1))
    assert isinstance(result, Score)
    first, second = server.arrival_times()
    assert second - first >= 0.29  # the backoff alone would be <= 0.05 s


async def test_cache_no_duplicates_and_resume_across_collectors(server, tmp_path):
    path = tmp_path / "feedback.sqlite"
    requests = make_requests(20)
    first = FeedbackCollector(MinimalJudge(server.base_url), cache=path, **FAST)
    results_1 = await first.collect(requests)
    assert server.count == 20
    again = await first.collect(requests)
    assert again == results_1 and server.count == 20 and first.usage.cache_hits == 20
    # A resumed run: a new collector (new process in real life) on the same file.
    second = FeedbackCollector(MinimalJudge(server.base_url), cache=path, **FAST)
    results_2 = await second.collect(requests + make_requests(5, start=20))
    assert results_2[:20] == results_1  # exact round trip through the cache
    assert server.count == 25 and second.usage.cache_hits == 20 and second.usage.requests_sent == 5
    answers = [answer_of(b) for b in server.bodies()]
    assert len(answers) == len(set(answers))  # the server never saw a request twice
    first.close()
    second.close()


async def test_failures_are_not_cached(server, tmp_path):
    server.faults = [Fault.status(400)]
    collector = FeedbackCollector(MinimalJudge(server.base_url), cache=tmp_path / "c.sqlite", **FAST)
    [failed] = await collector.collect(make_requests(1))
    assert isinstance(failed, FeedbackFailure)
    [ok] = await collector.collect(make_requests(1))
    assert isinstance(ok, Score) and server.count == 2
    assert len(collector.cache) == 1


async def test_inflight_dedup(server):
    server.latency = 0.1
    requests = make_requests(5)
    collector = FeedbackCollector(MinimalJudge(server.base_url), **FAST)
    batch = requests + requests[:3]  # duplicates inside one batch
    a, b = await asyncio.gather(collector.collect(batch), collector.collect(requests[2:]))  # and across calls
    assert server.count == 5
    assert [r.scores for r in a] == [expected_score(q) for q in batch]
    assert [r.scores for r in b] == [expected_score(q) for q in requests[2:]]
    assert collector.usage.deduplicated == 3 + 3


async def test_max_concurrency_respected_at_server(server):
    server.latency = 0.05
    collector = FeedbackCollector(MinimalJudge(server.base_url), max_concurrency=4, **FAST)
    results = await collector.collect(make_requests(40))
    assert all(isinstance(r, Score) for r in results)
    assert server.max_in_flight == 4  # reached, never exceeded


async def test_rpm_limit_respected_at_server(server):
    rpm = 1200  # 20 per second, bursts of at most 2
    judge = MinimalJudge(server.base_url)
    await FeedbackCollector(judge, max_concurrency=32).collect(make_requests(32, start=100))  # open connections
    server.reset_stats()
    collector = FeedbackCollector(judge, max_concurrency=32, rpm=rpm, **FAST)
    started = time.monotonic()  # the server stamps arrivals with the same clock
    results = await collector.collect(make_requests(50))
    assert all(isinstance(r, Score) for r in results)
    times = server.arrival_times()
    assert len(times) == 50 and times[-1] - started >= (50 - 2) / 20 - 0.01
    # jitter: delay between admission and arrival (a CPU stall on a shared machine can hold sends back,
    # then release them together); a missing or wrong limiter breaks this by far (50 arrive in ~0.3 s)
    rate, burst, jitter = rpm / 60, 2, 0.25
    for i, start in enumerate(times):
        for j in range(i, len(times)):
            assert j - i + 1 <= burst + rate * (times[j] - start + jitter)


async def test_budget_stops_sending_and_marks_the_rest(server):
    def costly(body: dict) -> dict:  # 1000 prompt tokens a call: $0.25 at $0.25 / 1k
        return {"id": "c", "object": "chat.completion", "created": 0, "model": "judge",
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant",
                                                                               "content": "Score: 3"}}],
                "usage": {"prompt_tokens": 1000, "completion_tokens": 0, "total_tokens": 1000}}

    server.responder = costly
    collector = FeedbackCollector(MinimalJudge(server.base_url), max_concurrency=1, budget_usd=0.75,
                                  price_per_1k_prompt_tokens=0.25, **FAST)
    results = await collector.collect(make_requests(6))
    assert [r.kind for r in results] == ["score"] * 3 + ["failure"] * 3
    assert all(r.error_type == "budget" and r.attempts == 0 and "not sent" in r.reason for r in results[3:])
    assert server.count == 3
    assert collector.usage.cost_usd == pytest.approx(0.75)
    assert collector.usage.budget_skipped == 3 and collector.usage.failures == 3


async def test_pointwise_split_merge_and_partial_failure(server, tmp_path):
    judge = MinimalJudge(server.base_url, pointwise=True)
    request = FeedbackRequest(prompt="q", completions=[Completion(text=t) for t in ["a", "bbbb", "cc"]])
    server.faults = lambda i, body: Fault.status(400) if answer_of(body) == "bbbb" else None
    collector = FeedbackCollector(judge, cache=tmp_path / "c.sqlite", **FAST)
    [merged] = await collector.collect([request])
    # one completion's failure does not sink the others: it is a missing value, theirs are scores
    assert isinstance(merged, Score) and merged.valid() == [True, False, True]
    assert merged.scores[0::2] == [1.0, 2.0] and math.isnan(merged.scores[1])
    assert merged.details["failed"][1]["error_type"] == "client_error"
    assert server.count == 3
    server.faults = None
    [merged] = await collector.collect([request])
    assert isinstance(merged, Score) and merged.scores == [1.0, 4.0, 2.0]
    assert server.count == 4  # only the failed completion was sent again; the others were cached


async def test_feedback_batch_gets_only_cache_misses(tmp_path):
    class BatchTeacher:
        id = "batch-teacher:1"

        def __init__(self):
            self.batches: list[int] = []

        async def feedback(self, request):
            raise AssertionError("the collector must use feedback_batch")

        async def feedback_batch(self, requests):
            self.batches.append(len(requests))
            return [Score(scores=[float(len(r.completions[0].text))]) for r in requests]

    teacher = BatchTeacher()
    collector = FeedbackCollector(teacher, cache=tmp_path / "c.sqlite")
    first = await collector.collect(make_requests(4))
    second = await collector.collect(make_requests(6))
    assert teacher.batches == [4, 2]
    assert second[:4] == first and [r.scores for r in second[4:]] == [[6.0], [7.0]]  # "xxxx#4", "xxxxx#5"


def test_collect_sync_plain_and_repeated(server):
    collector = FeedbackCollector(MinimalJudge(server.base_url), **FAST)
    for start in (0, 10):  # the same AsyncOpenAI client is reused across calls
        results = collector.collect_sync(make_requests(10, start=start))
        assert [r.scores for r in results] == [expected_score(q) for q in make_requests(10, start=start)]
    collector.close()


async def test_collect_sync_inside_a_running_loop_and_from_a_thread(server):
    collector = FeedbackCollector(MinimalJudge(server.base_url), **FAST)
    inside = collector.collect_sync(make_requests(3))  # called from a coroutine: blocks, but works
    out: list = []
    thread = threading.Thread(target=lambda: out.extend(collector.collect_sync(make_requests(3, start=3))))
    thread.start()
    thread.join(30)
    assert [r.scores for r in inside + out] == [expected_score(q) for q in make_requests(6)]
    collector.close()


async def test_teacher_bug_propagates_not_retried():
    """A non-TeacherError out of a teacher is a bug: it stops the run (it used to be a masked failure)."""
    class Broken:
        id = "broken:1"
        calls = 0

        async def feedback(self, request):
            Broken.calls += 1
            raise ValueError("oops")

    with pytest.raises(ValueError, match="oops"):
        await FeedbackCollector(Broken(), **FAST).collect(make_requests(3))
    assert Broken.calls == 3  # each request called once, none retried


def test_teacher_bug_propagates_from_collect_sync():
    class Broken:
        id = "broken:2"

        async def feedback(self, request):
            raise TypeError("a bug in our code")

    collector = FeedbackCollector(Broken(), **FAST)
    with pytest.raises(TypeError, match="a bug in our code"):
        collector.collect_sync(make_requests(2))
    collector.close()


async def test_wrong_number_of_scores_is_a_failure():
    class Short:
        id = "short:1"

        async def feedback(self, request):
            return Score(scores=[])

    request = FeedbackRequest(prompt="q", completions=[Completion(text="a"), Completion(text="b")])
    [result] = await FeedbackCollector(Short()).collect([request])
    assert isinstance(result, FeedbackFailure) and "0 scores for 2 completions" in result.reason


def test_bad_input_is_a_clear_error():
    from opd_sdk import ConfigError

    with pytest.raises(ConfigError, match="async `feedback"):
        FeedbackCollector(object())
    judge_like = type("T", (), {"id": "t:1", "feedback": lambda self, r: None})()
    with pytest.raises(ConfigError, match="max_concurrency"):
        FeedbackCollector(judge_like, max_concurrency=0)
    with pytest.raises(ConfigError, match="needs a price"):
        FeedbackCollector(judge_like, budget_usd=1.0)
    with pytest.raises(ConfigError, match="FeedbackRequest"):
        FeedbackCollector(judge_like).collect_sync([{"prompt": "q"}])


async def test_progress_bar_auto_off_when_not_a_terminal_and_works_when_on(server, capsys):
    judge = MinimalJudge(server.base_url)
    assert FeedbackCollector(judge).progress is False  # pytest captures stderr: not a terminal
    collector = FeedbackCollector(judge, progress=True)
    results = await collector.collect(make_requests(3))
    assert all(isinstance(r, Score) for r in results)
    err = capsys.readouterr().err
    assert "teacher feedback" in err and "/3 " in err


async def test_tpm_estimate_is_corrected_by_reported_usage(server):
    def fifty_tokens(body: dict) -> dict:  # every call really costs 50 tokens (the estimate is ~6)
        return {"id": "c", "object": "chat.completion", "created": 0, "model": "judge",
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant",
                                                                               "content": "Score: 1"}}],
                "usage": {"prompt_tokens": 40, "completion_tokens": 10, "total_tokens": 50}}

    server.responder = fifty_tokens
    collector = FeedbackCollector(MinimalJudge(server.base_url), max_concurrency=2, tpm=60_000, **FAST)
    started = time.monotonic()
    results = await collector.collect(make_requests(40))
    elapsed = time.monotonic() - started
    assert all(isinstance(r, Score) for r in results)
    assert collector.usage.prompt_tokens == 1600 and collector.usage.completion_tokens == 400
    # 2000 real tokens at 1000 tokens/s with a 1000-token burst: at least ~1 s (uncorrected: no wait at all)
    assert elapsed >= 0.9
