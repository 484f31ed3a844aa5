"""Judges that do not answer, verdict formats of common judge prompts, verdicts off the scale
(issue #22 item 6), against the scripted server with the real openai client; calls counted there."""

from __future__ import annotations

import pytest

from opd_sdk import FeedbackCollector, FeedbackFailure, Refused
from providers import JudgeTeacher, PreferenceTeacher
from providers.verdict import VerdictError, parse_choice, parse_score
from tests.providers.helpers import client_for, last_user, request
from tests.scripted_server import ScriptedServer, wrap_reply

FAST = {"backoff_initial_s": 0.01, "backoff_max_s": 0.02}


def reply(content, *, refusal=None, finish_reason="stop", completion_tokens=7):
    """A responder sending one chat.completion with these fields (and usage the server bills)."""
    def respond(body: dict) -> dict:
        out = wrap_reply("/v1/chat/completions", body, "")
        out["choices"][0]["message"] = {"role": "assistant", "content": content, "refusal": refusal}
        out["choices"][0]["finish_reason"] = finish_reason
        out["usage"] = {"prompt_tokens": 50, "completion_tokens": completion_tokens,
                        "total_tokens": 50 + completion_tokens}
        return out
    return respond


NON_ANSWERS = [
    pytest.param(reply(None, refusal="I can't help with grading that."), "I can't help with grading that",
                 id="refusal"),
    pytest.param(reply(None, finish_reason="content_filter"), "content_filter", id="content_filter"),
    pytest.param(reply('{"sc', finish_reason="content_filter"), "content_filter", id="content_filter_partial"),
    pytest.param(reply(None), "no content", id="null_content"),
    pytest.param(reply("  \n"), "no content", id="whitespace_content"),
]


@pytest.mark.parametrize("respond, said", NON_ANSWERS)
async def test_a_judge_that_does_not_answer_fails_fast_quoting_the_provider_and_counted_as_paid(respond, said):
    with ScriptedServer(respond) as srv:
        judge = JudgeTeacher("m", client=client_for(srv), max_reasks=3)
        with FeedbackCollector(judge, max_retries=5, progress=False, **FAST) as col:
            [fb] = await col.collect([request()])
        assert isinstance(fb, FeedbackFailure)
        assert fb.error_type == "refused" and not fb.retriable and said in fb.reason
        assert srv.count == 1  # no re-ask, no retry (was 18 calls)
        assert fb.usage.calls == 1 and fb.usage.prompt_tokens == 50 and fb.usage.completion_tokens == 7


async def test_a_refusing_pairwise_judge_fails_fast_and_the_error_carries_its_usage():
    with ScriptedServer(reply(None, refusal="No.")) as srv:
        teacher = PreferenceTeacher("m", client=client_for(srv), max_reasks=3)
        with pytest.raises(Refused, match="refused: 'No.'") as err:
            await teacher._verdict(request(), "a", "b")
        assert srv.count == 1 and err.value.usage.calls == 1


async def test_one_refused_completion_is_missing_and_the_others_keep_their_scores():
    def respond(body: dict) -> dict:
        if "bad words" in last_user(body):
            return reply(None, refusal="I won't.")(body)
        return reply('{"score": 6}')(body)

    with ScriptedServer(respond) as srv:
        judge = JudgeTeacher("m", client=client_for(srv))
        fb = await judge.feedback(request(texts=("19", "bad words")))
        assert fb.scores[0] == 0.6 and fb.scores[1] != fb.scores[1]  # NaN: missing, never a reward
        assert fb.details["failed"][1]["error_type"] == "refused"
        assert srv.count == 2 and fb.usage.calls == 2  # the refused call was paid too


VERDICTS = [  # (reply, score on 0-10) worked by hand
    ("The answer is right and clear.\n\nRating: [[8]]", 8.0),  # MT-Bench single-answer grading
    ("Rating: [[7.5]]", 7.5),
    ("Feedback: correct. [RESULT] 9", 9.0),  # Prometheus
    ("**Score:** 6/10", 6.0),
    ('```json\n{"score": 4}\n```', 4.0),
    ("<think>maybe 3</think> Final score: 5", 5.0),
    ("Rating: [[4/5]]", 8.0),  # an explicit fraction says its own scale
]


@pytest.mark.parametrize("text, expected", VERDICTS)
def test_verdict_formats_of_common_judge_prompts_are_read(text, expected):
    assert parse_score(text, 0, 10) == expected


@pytest.mark.parametrize("text, winner", [("Verdict: [[A]]", "A"), ("[[B]]", "B"), ("both fine [[C]]", "tie")])
def test_mt_bench_pairwise_verdicts_are_read(text, winner):
    assert parse_choice(text, ("A", "B", "tie")) == winner


def test_a_tie_is_refused_when_ties_are_not_allowed():
    with pytest.raises(VerdictError, match="winner must be one of"):
        parse_choice("[[C]]", ("A", "B"))


@pytest.mark.parametrize("text", ['{"score": 0.7}', "score: 0.7", '{"score": 1.0}', "Rating: [[0.9]]",
                                  '{"score": 85}', "score: -1"])
def test_a_verdict_off_the_configured_scale_is_not_rescaled_silently(text):
    with pytest.raises(VerdictError, match="scale is 0 to 10|outside the scale 0 to 10"):
        parse_score(text, 0, 10)
    # on a 0-1 scale the same 0.7 is what it says
    if text in ('{"score": 0.7}', "score: 0.7"):
        assert parse_score(text, 0, 1) == 0.7


async def test_a_judge_answering_on_a_0_1_scale_is_asked_once_naming_the_scale_then_fails():
    with ScriptedServer(reply('{"score": 0.7}')) as srv:
        judge = JudgeTeacher("m", client=client_for(srv))
        with FeedbackCollector(judge, max_retries=5, progress=False, **FAST) as col:
            [fb] = await col.collect([request()])
        assert isinstance(fb, FeedbackFailure) and fb.error_type == "bad_response"
        assert "scale is 0 to 10" in fb.reason  # not 0.07
        assert srv.count == 2 and "scale is 0 to 10" in last_user(srv.bodies()[1])
        assert fb.usage.calls == 2


async def test_an_unread_verdict_format_fails_after_at_most_one_reask():
    with ScriptedServer(reply("Good work overall!")) as srv:
        judge = JudgeTeacher("m", client=client_for(srv))
        with FeedbackCollector(judge, max_retries=5, progress=False, **FAST) as col:
            [fb] = await col.collect([request()])
        assert isinstance(fb, FeedbackFailure) and "did not parse after 2 calls" in fb.reason
        assert srv.count == 2
