"""make_collector and LocalRunner: local teachers run in process over the batch."""

from __future__ import annotations

import threading

import pytest

from opd_sdk.errors import ClientError
from opd_sdk.feedback.collector import FeedbackCollector
from opd_sdk.feedback.factory import Collector, make_collector
from opd_sdk.feedback.local import LocalRunner
from opd_sdk.feedback.teacher import FollowsStudent, is_local, notify_optimizer_step
from opd_sdk.types import Completion, FeedbackFailure, FeedbackRequest, Score
from providers import Gate, PreferenceScores, VerifierTeacher, WeightedSum


def req(answer: str | None, *texts: str) -> FeedbackRequest:
    meta = {} if answer is None else {"answer": answer}
    return FeedbackRequest(prompt="What is 3 + 4?", completions=[Completion(text=t) for t in texts], metadata=meta)


class Remote:
    """A stand-in remote teacher (it has no feedback_local)."""

    id = "remote:1"

    async def feedback(self, request):
        return Score(scores=[0.5] * len(request.completions))


class Counting:
    """A local teacher that records the thread it ran on and the batch sizes it got."""

    id = "counting:1"
    local = True

    def __init__(self):
        self.batches: list[int] = []
        self.threads: list[str] = []
        self.steps: list[int] = []

    async def feedback(self, request):
        raise AssertionError("a local teacher is called through feedback_local")

    def feedback_local(self, requests):
        self.batches.append(len(requests))
        self.threads.append(threading.current_thread().name)
        return [Score(scores=[float(len(c.text)) for c in r.completions]) for r in requests]

    def on_optimizer_step(self, step: int) -> None:
        self.steps.append(step)


def test_make_collector_picks_the_local_runner_for_local_teachers():
    verifier = VerifierTeacher("numeric")
    local = make_collector(verifier, max_concurrency=4, timeout=5.0)
    assert isinstance(local, LocalRunner) and isinstance(local, Collector)
    assert isinstance(make_collector(WeightedSum([(verifier, 1.0), (Counting(), 0.5)])), LocalRunner)
    remote = make_collector(Remote(), max_concurrency=4)
    assert isinstance(remote, FeedbackCollector) and isinstance(remote, Collector) and remote.max_concurrency == 4
    remote.close()
    assert isinstance(make_collector(Gate(verifier, Remote())), FeedbackCollector)  # one remote child
    assert not is_local(Gate(verifier, Remote())) and is_local(Gate(verifier, verifier))
    with pytest.raises(TypeError, match="max_concurency"):
        make_collector(verifier, max_concurency=4)


def test_local_runner_runs_in_the_calling_thread_in_one_batch_without_sqlite(tmp_path):
    teacher = Counting()
    runner = make_collector(teacher)
    requests = [req("7", "ab", "abc"), req("7", "a")]
    out = runner.collect_sync(requests)
    assert [f.scores for f in out] == [[2.0, 3.0], [1.0]]
    assert teacher.batches == [2] and teacher.threads == [threading.current_thread().name]
    assert runner.cache is None and list(tmp_path.iterdir()) == []
    assert runner.usage.requests_sent == 2 and runner.usage.failures == 0  # requests answered, in one call
    assert runner.teacher is teacher
    runner.close()


def test_local_runner_uses_a_cache_only_when_asked(tmp_path):
    teacher = Counting()
    with make_collector(teacher, cache=tmp_path / "c.sqlite") as runner:
        first = runner.collect_sync([req("7", "ab")])
        again = runner.collect_sync([req("7", "ab"), req("7", "abcd")])
    assert again[0] == first[0] and again[1].scores == [4.0]
    assert teacher.batches == [1, 1] and runner.usage.cache_hits == 1 and runner.usage.requests_sent == 2


def test_verifier_failures_are_per_request_values_never_retried():
    runner = make_collector(VerifierTeacher("numeric"))
    out = runner.collect_sync([req("7", "7", "8"), req(None, "7"), req("  ", "")])
    assert out[0].scores == [1.0, 0.0]
    assert isinstance(out[1], FeedbackFailure) and out[1].error_type == "client_error" and out[1].attempts == 1
    assert isinstance(out[2], FeedbackFailure) and "expected answer is empty" in out[2].reason
    assert runner.usage.failures == 2


def test_a_bug_in_a_local_teacher_propagates():
    class Buggy(Counting):
        def feedback_local(self, requests):
            raise TypeError("a bug")

    with pytest.raises(TypeError, match="a bug"):
        make_collector(Buggy()).collect_sync([req("7", "7")])


def test_a_teacher_error_for_the_whole_batch_fails_each_request():
    class Down(Counting):
        def feedback_local(self, requests):
            raise ClientError("checker binary missing")

    out = make_collector(Down()).collect_sync([req("7", "7"), req("7", "8")])
    assert [f.error_type for f in out] == ["client_error", "client_error"]


def test_composites_forward_the_optimizer_step_to_their_children():
    a, b = Counting(), Counting()
    composite = PreferenceScores(WeightedSum([(a, 1.0), (Gate(VerifierTeacher(), b), 1.0)]))
    assert isinstance(composite, FollowsStudent)
    notify_optimizer_step(composite, 3)
    assert a.steps == [3] and b.steps == [3]
    notify_optimizer_step(VerifierTeacher(), 3)  # a teacher that does not follow the student: nothing


def test_local_gate_and_weighted_sum_match_their_async_answers():
    verifier = VerifierTeacher("numeric")
    gate = Gate(verifier, Counting(), threshold=1.0, fail_score=0.0)
    out = make_collector(gate).collect_sync([req("7", "7", "8", "x 7")])
    assert out[0].scores == [1.0, 0.0, 3.0]  # judged by length where the verifier passes
    total = make_collector(WeightedSum([(verifier, 2.0), (Counting(), 0.5)])).collect_sync([req("7", "7", "8")])
    assert total[0].scores == [2.5, 0.5]


def test_providers_declare_the_capabilities_the_collector_and_trainer_read():
    """Each provider satisfies exactly the optional protocols it is used through (isinstance, no getattr)."""
    from opd_sdk.feedback.teacher import (
        BatchTeacher,
        Closeable,
        CountsCalls,
        LocalTeacher,
        Pointwise,
        Teacher,
        is_cacheable,
    )
    from providers import (
        JudgeTeacher,
        LogprobTeacher,
        PreferenceTeacher,
        ReferenceTeacher,
        RewardModelTeacher,
    )

    url = "http://127.0.0.1:9/v1"
    judge = JudgeTeacher("m", base_url=url)
    remote = [judge, PreferenceTeacher("m", base_url=url), ReferenceTeacher("m", base_url=url),
              LogprobTeacher("m", base_url=url), RewardModelTeacher("http://127.0.0.1:9/r")]
    for teacher in remote:
        assert isinstance(teacher, Teacher) and not is_local(teacher) and is_cacheable(teacher), teacher
    assert all(isinstance(t, Closeable) for t in remote[:4])  # their Endpoint's client
    assert isinstance(judge, Pointwise) and isinstance(judge, CountsCalls)
    verifier = VerifierTeacher()
    assert isinstance(verifier, LocalTeacher) and is_local(verifier) and not isinstance(verifier, BatchTeacher)
    assert not isinstance(verifier, FollowsStudent)
    assert not is_local(JudgeTeacher("m", base_url=url, mode="listwise"))
