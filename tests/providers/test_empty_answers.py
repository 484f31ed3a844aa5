"""Empty answers get no credit from any teacher, and cost no call (issue #22 item 7).

Every teacher here is lenient: it would give any text, "" included, 9 out of 10 (or call it a tie).
An empty or whitespace-only completion must still score 0.0 (`opd_sdk.feedback.empty`), and the
scripted server counts that it was never sent.
"""

from __future__ import annotations

import json
import math

import pytest

from opd_sdk import FeedbackCollector, Preference, PreferencePair, Score
from providers import (
    Gate,
    JudgeTeacher,
    PreferenceScores,
    PreferenceTeacher,
    RewardModelTeacher,
    VerifierTeacher,
    WeightedSum,
)
from tests.providers.helpers import client_for, fenced_texts, first_user, request
from tests.scripted_server import ScriptedServer

EMPTY = ("", "   ", " \n\t ")


def lenient_judge(body: dict) -> str:
    """9 for every response shown, pointwise or listwise; "tie" for a pair."""
    texts = fenced_texts(body)
    if "RESPONSE A" in first_user(body):
        return json.dumps({"winner": "tie"})
    if "RESPONSE 0" in first_user(body):
        return json.dumps({"scores": [9] * len(texts)})
    return json.dumps({"score": 9})


@pytest.mark.parametrize("blank", EMPTY)
async def test_an_empty_answer_scores_zero_at_a_pointwise_judge_without_a_call(blank):
    with ScriptedServer(lenient_judge) as srv:
        judge = JudgeTeacher("m", client=client_for(srv))
        with FeedbackCollector(judge, progress=False) as col:
            [fb] = await col.collect([request(texts=("19", blank, "it is 19"))])
        assert fb.scores == [0.9, 0.0, 0.9]
        assert srv.count == 2  # the empty one was never sent


async def test_an_empty_answer_scores_zero_at_a_listwise_judge_and_is_not_shown_to_it():
    with ScriptedServer(lenient_judge) as srv:
        judge = JudgeTeacher("m", client=client_for(srv), mode="listwise")
        fb = await judge.feedback(request(texts=("", "19", "  ")))
        assert fb.scores == [0.0, 0.9, 0.0]
        assert srv.count == 1 and fenced_texts(srv.bodies()[0]) == ["19"]
        assert fb.details["empty"] == [0, 2] and fb.details["graded"] == [1] and fb.usage.calls == 1


async def test_a_request_of_only_empty_answers_sends_nothing():
    with ScriptedServer(lenient_judge) as srv:
        for judge in (JudgeTeacher("m", client=client_for(srv)),
                      JudgeTeacher("m", client=client_for(srv), mode="listwise")):
            fb = await judge.feedback(request(texts=EMPTY))
            assert fb.scores == [0.0, 0.0, 0.0] and fb.usage.calls == 0
        pref = await PreferenceTeacher("m", client=client_for(srv)).feedback(request(texts=("", " ")))
        assert pref.pairs == [] and pref.usage.calls == 0
        assert srv.count == 0


async def test_an_empty_answer_loses_every_comparison_without_a_call():
    with ScriptedServer(lenient_judge) as srv:
        teacher = PreferenceTeacher("m", client=client_for(srv))
        fb = await teacher.feedback(request(texts=("19", "", "it is 19")))
        assert isinstance(fb, Preference)
        assert set(fb.pairs) == {PreferencePair(winner=0, loser=2, probability=0.5),  # a tie, in both orders
                                 PreferencePair(winner=0, loser=1, probability=1.0),
                                 PreferencePair(winner=2, loser=1, probability=1.0)}
        assert srv.count == 2  # one pair, both orders: the empty one was compared with nothing
        srv.reset_stats()
        alone = await teacher.feedback(request(texts=("19", " ")))
        assert alone.pairs == [PreferencePair(winner=0, loser=1, probability=1.0)] and srv.count == 0


async def test_preference_scores_give_an_empty_answer_zero():
    with ScriptedServer(lenient_judge) as srv:
        scores = PreferenceScores(PreferenceTeacher("m", client=client_for(srv)), method="win_rate")
        fb = await scores.feedback(request(texts=("19", "", "it is 19", " ")))
        # "19" and "it is 19": tie with each other (0.5), beat both empty ones (1.0): (0.5 + 1 + 1) / 3
        assert fb.scores == [pytest.approx(2.5 / 3), 0.0, pytest.approx(2.5 / 3), 0.0]
        assert srv.count == 2


async def test_an_empty_answer_is_not_sent_to_a_reward_model():
    with ScriptedServer(handlers={"/reward": lambda body: {"rewards": [9.0] * len(body["query"])}}) as srv:
        url = srv.base_url.replace("/v1", "/reward")
        normalized = await RewardModelTeacher(url, normalize=(0.0, 10.0)).feedback(request(texts=("19", " ")))
        assert normalized.scores == [0.9, 0.0]
        raw = await RewardModelTeacher(url).feedback(request(texts=("19", "")))
        assert raw.scores[0] == 9.0 and math.isnan(raw.scores[1])  # 0.0 on a raw scale might be credit
        assert srv.count == 2 and all(body["query"] == ["What is 12 + 7?19"] for body in srv.bodies())
        srv.reset_stats()
        assert (await RewardModelTeacher(url, normalize=(0.0, 10.0)).feedback(request(texts=("",)))).scores == [0.0]
        assert srv.count == 0


async def test_composites_give_an_empty_answer_zero_without_a_call():
    with ScriptedServer(lenient_judge) as srv:
        judge = JudgeTeacher("m", client=client_for(srv))
        req = request(texts=("19", "", "  "), metadata={"answer": "19"})
        gated = await Gate(VerifierTeacher(), judge).feedback(req)
        summed = await WeightedSum([(VerifierTeacher(), 0.5), (judge, 2.0)]).feedback(req)
        assert isinstance(gated, Score) and gated.scores == [0.9, 0.0, 0.0]
        assert summed.scores == [pytest.approx(0.5 + 1.8), 0.0, 0.0]
        assert srv.count == 2  # one call each for "19"


@pytest.mark.parametrize("mode, kw", [("numeric", {}), ("exact", {}), ("regex", {"pattern": r"\s*"})])
def test_the_verifier_gives_an_empty_answer_zero_in_every_mode(mode, kw):
    teacher = VerifierTeacher(mode, **kw)
    assert teacher.score(request(texts=EMPTY, metadata={"answer": "19"})).scores == [0.0, 0.0, 0.0]
