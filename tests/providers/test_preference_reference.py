"""PreferenceTeacher and ReferenceTeacher against the scripted server."""

from __future__ import annotations

import json

import pytest

from opd_sdk import (
    FeedbackCollector,
    FeedbackFailure,
    Preference,
    Reference,
    TeacherError,
)
from providers import PreferenceTeacher, ReferenceTeacher
from tests.providers.helpers import client_for, fenced_texts, request
from tests.scripted_server import ScriptedServer as ScriptedServer


def always_a(body: dict) -> str:
    return json.dumps({"winner": "A"})


def prefers_19(body: dict) -> str:
    a, b = fenced_texts(body)
    if ("19" in a) == ("19" in b):
        return json.dumps({"winner": "tie"})
    return json.dumps({"winner": "A" if "19" in a else "B"})


async def test_position_bias_cancels_to_a_tie():
    with ScriptedServer(always_a) as srv:
        teacher = PreferenceTeacher("m", client=client_for(srv))
        fb = await teacher.feedback(request(texts=("19", "9")))
        assert isinstance(fb, Preference)
        assert [(p.winner, p.loser, p.probability) for p in fb.pairs] == [(0, 1, 0.5)]
        # both orders were asked: (19, 9) and (9, 19)
        assert sorted(tuple(fenced_texts(b)) for b in srv.bodies()) == [("19", "9"), ("9", "19")]
        assert fb.usage.calls == 2


async def test_consistent_judge_gives_probability_one_and_ties_count_half():
    with ScriptedServer(prefers_19) as srv:
        teacher = PreferenceTeacher("m", client=client_for(srv))
        req = request(texts=("9", "it is 19", "19!"))
        assert teacher.api_calls(req) == 6
        fb = await teacher.feedback(req)
        got = {(p.winner, p.loser): p.probability for p in fb.pairs}
        assert got == {(1, 0): 1.0, (2, 0): 1.0, (1, 2): 0.5}
        assert srv.count == 6
        schema = srv.bodies()[0]["response_format"]["json_schema"]["schema"]
        assert schema["properties"]["winner"]["enum"] == ["A", "B", "tie"]


async def test_one_sided_tie_gives_three_quarters():
    def judge(body: dict) -> str:  # says "tie" when "19" is A, "B" (i.e. 19) when 19 is B
        a, _ = fenced_texts(body)
        return json.dumps({"winner": "tie" if "19" in a else "B"})

    with ScriptedServer(judge) as srv:
        fb = await PreferenceTeacher("m", client=client_for(srv)).feedback(request(texts=("19", "9")))
        assert [(p.winner, p.loser, p.probability) for p in fb.pairs] == [(0, 1, 0.75)]


async def test_preference_needs_two_completions_and_reasks_bad_verdicts():
    script = {"19": iter(["no idea", '{"winner": "C"}', '{"winner": "a"}']), "9": iter(['{"winner": "B"}'])}
    with ScriptedServer(lambda body: next(script[fenced_texts(body)[0]])) as srv:
        teacher = PreferenceTeacher("m", client=client_for(srv), structured="none", max_reasks=2)
        with pytest.raises(TeacherError, match="at least 2"):
            await teacher.feedback(request(texts=("19",)))
        fb = await teacher.feedback(request(texts=("19", "9")))
        # order A=19: "no idea", "C", then "a" (A, case-insensitive) after two re-asks; order A=9: "B"
        assert [(p.winner, p.loser, p.probability) for p in fb.pairs] == [(0, 1, 1.0)]
        assert srv.count == 4 and fb.usage.calls == 4


def n_choices(body: dict) -> dict:
    n = body.get("n", 1)
    choices = [{"index": i, "finish_reason": "stop", "logprobs": None,
                "message": {"role": "assistant", "content": f"answer {i} at T={body['temperature']}"}}
               for i in range(n)]
    return {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": choices,
            "usage": {"prompt_tokens": 10, "completion_tokens": 4 * n, "total_tokens": 10 + 4 * n}}


async def test_reference_samples_n_answers_in_one_call():
    with ScriptedServer(n_choices) as srv:
        teacher = ReferenceTeacher("m", client=client_for(srv), n=3, temperature=0.7, max_tokens=50)
        fb = await teacher.feedback(request(prompt="Say hi", texts=("hello",)))
        assert isinstance(fb, Reference)
        assert [c.text for c in fb.completions] == [f"answer {i} at T=0.7" for i in range(3)]
        body = srv.bodies()[0]
        assert body["n"] == 3 and body["max_tokens"] == 50
        assert body["messages"] == [{"role": "user", "content": "Say hi"}]  # the student's text is not sent
        assert fb.usage.completion_tokens == 12 and fb.usage.calls == 1


async def test_reference_is_cached_per_prompt_so_a_second_epoch_is_free(tmp_path):
    with ScriptedServer(n_choices) as srv:
        teacher = ReferenceTeacher("m", client=client_for(srv), n=2)
        epoch1 = [request(prompt=f"q{i}", texts=("first try",)) for i in range(3)]
        epoch2 = [request(prompt=f"q{i}", texts=("another sample",)) for i in range(3)]
        with FeedbackCollector(teacher, cache=tmp_path / "c.sqlite", progress=False) as col:
            a = await col.collect(epoch1)
            assert srv.count == 3
            b = await col.collect(epoch2)
            assert srv.count == 3 and [x.completions for x in a] == [x.completions for x in b]
            assert col.usage.cache_hits == 3


async def test_reference_separate_calls_and_privileged_context():
    with ScriptedServer(n_choices) as srv:
        teacher = ReferenceTeacher("m", client=client_for(srv), n=2, n_per_call=False, use_privileged=True)
        req = request(prompt="q", privileged="the answer is 4")
        assert teacher.api_calls(req) == 2
        fb = await teacher.feedback(req)
        assert len(fb.completions) == 2 and srv.count == 2
        assert "the answer is 4" in srv.bodies()[0]["messages"][0]["content"]
        assert teacher.cache_key(req) != teacher.cache_key(request(prompt="q", privileged="other"))


async def test_reference_empty_answer_is_a_failure_through_the_collector():
    with ScriptedServer(lambda body: "") as srv:
        teacher = ReferenceTeacher("m", client=client_for(srv))
        with FeedbackCollector(teacher, max_retries=1, progress=False, backoff_initial_s=0.01) as col:
            [fb] = await col.collect([request()])
        assert isinstance(fb, FeedbackFailure) and "non-empty" in fb.reason



