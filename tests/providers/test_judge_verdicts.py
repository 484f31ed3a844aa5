"""Issue 14, section 1: judge verdicts are the final one; cut-off replies, context overflow and
position bias are handled. Real openai client against the scripted server."""

from __future__ import annotations

import json
import math

import pytest

from opd_sdk import FeedbackCollector, FeedbackFailure, Score
from opd_sdk.errors import Truncated
from providers import JudgeTeacher, PreferenceTeacher
from providers.verdict import VerdictError, parse_choice, parse_score, parse_scores
from tests.providers.helpers import client_for, fenced_texts, request
from tests.scripted_server import Fault, ScriptedServer

FAST = dict(backoff_initial_s=0.01, backoff_max_s=0.02)


def shown(scores):
    """Scores rounded, a missing one (NaN) as None."""
    return [None if s is None or math.isnan(s) else round(s, 6) for s in scores]


@pytest.mark.parametrize("reply, expected", [
    ("I weighed score: 9, but 7x8 is 56 so the sum is right. Final score: 3", 3),  # the issue's example
    ("**Score:** 8/10", 8),
    ("Rating: 4/5", 8),  # a fraction is a share of the scale
    ("I'd give it 7/10.", 7),
    ("<think>score: 2? no, score: 9</think>\n{\"score\": 6}", 6),  # reasoning blocks are not verdicts
    ("<think>maybe score: 9", None),  # only reasoning, never closed: no verdict
    ('Draft: {"score": 4}\nFinal: {"score": 6}', 6),
    ('{"score": 4, "final_score": 5}', 5),
    ("## Final Score\n**7**", 7),
    ("Final verdict: 5 out of 10", 5),
    ("score: 9 ... so the score: 9", 9),  # two equal verdicts agree
    ("The ratio 3/4 is right. Score: 6", 6),  # a fraction over another denominator is not a verdict
    ('{"score": 4} {"score": 6}', None),  # two different verdicts, none final
    ("score: 9. On reflection, score: 3", None),
    ("It is good.", None),
])
def test_parse_score_takes_the_final_verdict(reply, expected):
    if expected is None:
        with pytest.raises(VerdictError):
            parse_score(reply, 0, 10)
    else:
        assert parse_score(reply, 0, 10) == expected


def test_parse_scores_and_choice_take_the_final_one():
    assert parse_scores('{"scores": [1, 2]} Final: {"scores": [3, 4]}', 2, 0, 10) == [3, 4]
    with pytest.raises(VerdictError, match="none is marked final"):
        parse_scores('{"scores": [1, 2]} {"scores": [3, 4]}', 2, 0, 10)
    assert parse_choice("winner: A ... Final winner: B", ("A", "B", "tie")) == "B"
    with pytest.raises(VerdictError, match="none is marked final"):
        parse_choice('{"winner": "A"} then {"winner": "B"}', ("A", "B"))


async def test_the_issues_example_scores_0_3_end_to_end():
    reply = "I weighed score: 9, but 7x8 is 56 so the sum is right. Final score: 3"
    with ScriptedServer(lambda body: reply) as srv:
        judge = JudgeTeacher("m", client=client_for(srv), structured="none")
        fb = await judge.feedback(request())
    assert fb.scores == [pytest.approx(0.3)]


async def test_two_verdicts_none_final_is_asked_again():
    replies = iter(["score: 9. On reflection, score: 3", '{"score": 3}'])
    with ScriptedServer(lambda body: next(replies)) as srv:
        judge = JudgeTeacher("m", client=client_for(srv), structured="none")
        fb = await judge.feedback(request())
        second = srv.bodies()[1]["messages"][-1]["content"]
    assert fb.scores == [pytest.approx(0.3)] and srv.count == 2
    assert "none is marked final" in second


def cut_off(body: dict) -> dict:
    return {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "finish_reason": "length",
                         "message": {"role": "assistant", "content": "Let me think step by step about"}}],
            "usage": {"prompt_tokens": 50, "completion_tokens": 200, "total_tokens": 250}}


async def test_a_reply_cut_off_by_the_token_limit_fails_at_once():
    with ScriptedServer(cut_off) as srv:
        judge = JudgeTeacher("m", client=client_for(srv), max_tokens=200)
        with pytest.raises(Truncated, match="raise max_tokens"):
            await judge.feedback(request())
        assert srv.count == 1
        srv.reset_stats()
        with FeedbackCollector(judge, progress=False, **FAST) as col:  # 18 paid calls before the fix
            [failure] = await col.collect([request()])
        assert isinstance(failure, FeedbackFailure)
        assert (failure.error_type, failure.retriable, failure.attempts, srv.count) == ("truncated", False, 1, 1)
        assert "max_tokens=200" in failure.reason
        pref = PreferenceTeacher("m", client=client_for(srv))
        with pytest.raises(Truncated):
            await pref.feedback(request(texts=("a", "b")))


def overflow_on_long(body: dict) -> str:
    return json.dumps({"score": len(fenced_texts(body)[0]) % 11})


def too_long(index: int, body: dict):
    texts = fenced_texts(body)
    if any(len(t) > 100 for t in texts):
        return Fault.status(400, message="This model's maximum context length is 2048 tokens. "
                                         "However, you requested 9000 tokens.")
    return None


async def test_context_overflow_on_one_completion_does_not_sink_the_group(tmp_path):
    group = request(texts=("abc", "x" * 500, "abcdefg"))
    with ScriptedServer(overflow_on_long, faults=too_long) as srv:
        judge = JudgeTeacher("m", client=client_for(srv))
        fb = await judge.feedback(group)  # called directly (as inside a composite)
        assert shown(fb.scores) == [0.3, None, 0.7]
        assert fb.details["failed"][1]["error_type"] == "client_error"
        with FeedbackCollector(judge, progress=False, **FAST) as col:  # split per completion
            [merged] = await col.collect([group])
        assert isinstance(merged, Score) and shown(merged.scores) == [0.3, None, 0.7]

        listwise = JudgeTeacher("m", client=client_for(srv), mode="listwise")
        srv.reset_stats()
        fb = await listwise.feedback(group)  # the list overflows: each completion alone
        assert shown(fb.scores) == [0.3, None, 0.7]
        assert "maximum context length" in fb.details["listwise_overflow"] and srv.count == 4


async def test_a_retriable_error_on_one_completion_is_retried_not_masked():
    def flaky(index: int, body: dict):
        return Fault.status(503) if index == 1 else None

    with ScriptedServer(lambda body: '{"score": 5}', faults=flaky) as srv:
        judge = JudgeTeacher("m", client=client_for(srv))
        with FeedbackCollector(judge, progress=False, **FAST) as col:
            [score] = await col.collect([request(texts=("a", "b"))])
    assert score.scores == [0.5, 0.5]


async def test_listwise_order_is_shuffled_and_mapped_back():
    def first_position_wins(body: dict) -> str:  # a judge with pure position bias
        n = len(fenced_texts(body))
        return json.dumps({"scores": [10] + [0] * (n - 1)})

    def length_scores(body: dict) -> str:
        return json.dumps({"scores": [len(t) for t in fenced_texts(body)]})

    winners = []
    with ScriptedServer(first_position_wins) as srv:
        judge = JudgeTeacher("m", client=client_for(srv), mode="listwise")
        for i in range(24):
            fb = await judge.feedback(request(prompt=f"q{i}", texts=("a", "bb", "ccc")))
            winners.append(fb.scores.index(1.0))
            shown = fenced_texts(srv.bodies()[-1])
            assert shown == [["a", "bb", "ccc"][k] for k in fb.details["order"]]
    assert set(winners) == {0, 1, 2}  # the bias lands on every completion, not always on the first
    with ScriptedServer(length_scores) as srv:
        judge = JudgeTeacher("m", client=client_for(srv), mode="listwise")
        for i in range(5):  # whatever the order shown, each score comes back to its completion
            fb = await judge.feedback(request(prompt=f"q{i}", texts=("a", "bb", "ccc")))
            assert fb.scores == [pytest.approx(0.1), pytest.approx(0.2), pytest.approx(0.3)]
