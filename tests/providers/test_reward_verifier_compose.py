"""RewardModelTeacher (real HTTP via httpx to the scripted server), VerifierTeacher and combinators."""

from __future__ import annotations

import json
import math

import pytest

from opd_sdk import (
    ConfigError,
    FeedbackCollector,
    FeedbackFailure,
    Preference,
    PreferencePair,
    Score,
    TeacherError,
)
from providers import (
    Gate,
    JudgeTeacher,
    PreferenceScores,
    RewardModelTeacher,
    VerifierTeacher,
    WeightedSum,
    bradley_terry,
    extract_number,
    last_boxed,
    win_rates,
)
from tests.providers.helpers import client_for, fenced_texts, request
from tests.scripted_server import Fault, ScriptedServer


def length_rewards(body: dict) -> dict:
    return {"rewards": [float(len(q)) for q in body["query"]]}


async def test_reward_model_openrlhf_contract():
    with ScriptedServer(handlers={"/reward": length_rewards}) as srv:
        teacher = RewardModelTeacher(srv.base_url.replace("/v1", "/reward"), api_key="fake-rm-test-key")
        fb = await teacher.feedback(request(prompt="Q:", texts=("ab", "abcd"), metadata={"answer": "19"}))
        assert fb.scores == [4.0, 6.0] and fb.details["raw"] == [4.0, 6.0] and fb.usage.calls == 1
        body = srv.bodies("/reward")[0]
        assert body == {"query": ["Q:ab", "Q:abcd"], "prompts": ["Q:", "Q:"], "labels": ["19", "19"]}
        assert srv.requests[0].has_auth
        assert "fake-rm-test-key" not in teacher.id + repr(teacher)


async def test_reward_model_custom_keys_normalize_and_custom_contract():
    def custom(body: dict) -> dict:
        if "texts" in body:
            return {"out": {"scores": [len(x) for x in body["texts"]]}}
        return {"r": [len(t) for t in body["inputs"]]}

    with ScriptedServer(handlers={"/rm": custom}) as srv:
        url = srv.base_url.replace("/v1", "/rm")
        keyed = RewardModelTeacher(url, query_key="inputs", prompts_key="p", labels_key="l", rewards_key="r",
                                   normalize=(0.0, 10.0))
        assert (await keyed.feedback(request(prompt="Q:", texts=("abc",)))).scores == [0.5]
        own = RewardModelTeacher(url, build_payload=lambda r: {"texts": [c.text for c in r.completions]},
                                 parse_rewards=lambda body, n: body["out"]["scores"])
        assert (await own.feedback(request(texts=("a", "abc")))).scores == [1.0, 3.0]
        assert keyed.id != own.id


async def test_reward_model_errors_are_typed_and_bad_replies_are_failures_not_zeros():
    replies = iter([{"rewards": [1.0]}, {"rewards": ["high", 2]}, {"nope": 1}])
    with ScriptedServer(handlers={"/rm": lambda body: next(replies)},
                        faults=[None, None, None, Fault.status(503, retry_after="0.2"), Fault.status(400)]) as srv:
        teacher = RewardModelTeacher(srv.base_url.replace("/v1", "/rm"))
        two = request(texts=("a", "b"))
        for match in ("expected 2 rewards", "finite numbers", "no 'rewards' list"):
            with pytest.raises(TeacherError, match=match) as err:
                await teacher.feedback(two)
            assert err.value.retriable
        with pytest.raises(TeacherError) as err:
            await teacher.feedback(two)
        assert err.value.status == 503 and err.value.retriable and err.value.retry_after == pytest.approx(0.2)
        with pytest.raises(TeacherError) as err:
            await teacher.feedback(two)
        assert err.value.status == 400 and not err.value.retriable
    with pytest.raises(TeacherError, match="connection refused") as err:  # server gone: nothing listening
        await teacher.feedback(two)
    assert not err.value.retriable and "/rm" in str(err.value)  # fails fast (#24.2), naming the URL
    with pytest.raises(ConfigError, match="http"):
        RewardModelTeacher("localhost:5000")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 19.", 19.0),
        ("First 3, then 4, so \\boxed{7} is it, not 8", 7.0),
        ("\\boxed{\\frac{1}{2}} hmm 2", 0.5),  # the boxed LaTeX fraction, read as the number it is
        ("Total: 1,234 apples", 1234.0),
        ("-3.5 degrees", -3.5),
        ("no digits here", None),
    ],
)
def test_number_extraction(text, expected):
    assert extract_number(text) == expected


def test_last_boxed_handles_nesting():
    assert last_boxed("a \\boxed{1} b \\boxed{x^{2}+1} c") == "x^{2}+1"
    assert last_boxed("no box") is None and last_boxed("\\boxed{open") is None


async def test_verifier_modes():
    req = request(texts=("so it is 19", "it is 19.0004", "\\boxed{ 19 }", "nine"), metadata={"answer": "19"})
    assert (await VerifierTeacher("numeric").feedback(req)).scores == [1.0, 0.0, 1.0, 0.0]
    assert (await VerifierTeacher("numeric", atol=1e-3).feedback(req)).scores == [1.0, 1.0, 1.0, 0.0]
    assert (await VerifierTeacher("exact").feedback(req)).scores == [0.0, 0.0, 1.0, 0.0]
    assert (await VerifierTeacher("regex", pattern=r"is {answer}$").feedback(req)).scores == [1.0, 0.0, 0.0, 0.0]
    fuzzy = VerifierTeacher(check=lambda text, want: 0.5 if want in text else 0.0)
    assert (await fuzzy.feedback(req)).scores == [0.5, 0.5, 0.5, 0.0]
    privileged = request(texts=("Paris", " paris "), privileged="PARIS")
    assert (await VerifierTeacher("exact").feedback(privileged)).scores == [1.0, 1.0]
    assert VerifierTeacher("exact").id != VerifierTeacher("numeric").id


async def test_verifier_without_an_answer_is_a_failure_not_a_zero():
    with FeedbackCollector(VerifierTeacher(), progress=False) as col:
        [fb] = await col.collect([request(texts=("19",))])
    assert isinstance(fb, FeedbackFailure) and not fb.retriable and "metadata['answer']" in fb.reason
    with pytest.raises(ConfigError, match="pattern="):
        VerifierTeacher("regex")


def test_win_rate_and_bradley_terry_by_hand():
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # theta = (1, 0, -1): P(0>1) = s(1), P(1>2) = s(1), P(0>2) = s(2); the MLE recovers theta.
    pairs = [PreferencePair(winner=0, loser=1, probability=s(1)), PreferencePair(winner=1, loser=2, probability=s(1)),
             PreferencePair(winner=0, loser=2, probability=s(2))]
    theta = bradley_terry(pairs, 3, l2=1e-9)
    assert theta == [pytest.approx(1.0, abs=1e-6), pytest.approx(0.0, abs=1e-6), pytest.approx(-1.0, abs=1e-6)]
    assert win_rates(pairs, 3) == pytest.approx([(s(1) + s(2)) / 2, 0.5, 1 - (s(1) + s(2)) / 2])
    # one pair at p = 1: the prior keeps theta finite; at the optimum theta = (-t, t) with
    # 1 - s(2t) = l2 * t (gradient zero), t = 2.9171 for l2 = 1e-3.
    strong = bradley_terry([PreferencePair(winner=1, loser=0, probability=1.0)], 2, l2=1e-3)
    t = strong[1]
    assert strong[0] == pytest.approx(-t) and 1 - s(2 * t) == pytest.approx(1e-3 * t) and t == pytest.approx(2.9171, abs=1e-4)


async def test_preference_scores_from_a_real_preference_teacher():
    from providers import PreferenceTeacher

    def prefers_19(body: dict) -> str:
        a, b = fenced_texts(body)
        return json.dumps({"winner": "tie" if ("19" in a) == ("19" in b) else ("A" if "19" in a else "B")})

    with ScriptedServer(prefers_19) as srv:
        pref = PreferenceTeacher("m", client=client_for(srv))
        win = PreferenceScores(pref, method="win_rate")
        fb = await win.feedback(request(texts=("9", "19")))
        assert fb.scores == [0.0, 1.0] and fb.usage.calls == 2 and win.api_calls(request(texts=("a", "b"))) == 2
        bt = await PreferenceScores(pref).feedback(request(texts=("9", "19", "it is 19")))
        assert bt.scores[1] == pytest.approx(bt.scores[2]) and bt.scores[0] < 0.05 < 0.5 < bt.scores[1]


async def test_weighted_sum_and_gate():
    def judge(body: dict) -> str:
        return json.dumps({"score": min(10, len(fenced_texts(body)[0]))})

    with ScriptedServer(judge) as srv:
        llm = JudgeTeacher("m", client=client_for(srv))
        req = request(texts=("19", "9", "it is 19"), metadata={"answer": "19"})
        mixed = await WeightedSum([(VerifierTeacher(), 0.5), (llm, 2.0)]).feedback(req)
        assert mixed.scores == pytest.approx([0.5 + 2 * 0.2, 0.0 + 2 * 0.1, 0.5 + 2 * 0.8])
        assert mixed.usage.calls == 3
        srv.reset_stats()
        gate = Gate(VerifierTeacher(), llm, fail_score=-1.0)
        gated = await gate.feedback(req)
        assert gated.scores == pytest.approx([0.2, -1.0, 0.8]) and srv.count == 2  # "9" never reached the judge
        assert gated.details["passed"] == [0, 2] and gate.api_calls(req) == 3


async def test_composites_fail_when_a_part_fails():
    with ScriptedServer(lambda body: '{"score": 5}', faults=lambda i, body: Fault.status(500)) as srv:
        llm = JudgeTeacher("m", client=client_for(srv))
        with FeedbackCollector(WeightedSum([(VerifierTeacher(), 1.0), (llm, 1.0)]), max_retries=1,
                               progress=False, backoff_initial_s=0.01) as col:
            [fb] = await col.collect([request(metadata={"answer": "19"})])
        assert isinstance(fb, FeedbackFailure) and fb.retriable
    with pytest.raises(TeacherError, match="need a Preference"):
        await PreferenceScores(VerifierTeacher()).feedback(request(texts=("1", "2"), metadata={"answer": "1"}))
    assert isinstance(Score(scores=[0.0]), Score) and isinstance(Preference(pairs=[]), Preference)


class Fixed:
    """A local teacher that answers fixed scores (NaN, inf or None included) for every request."""

    local = True

    def __init__(self, scores, name="fixed"):
        self.scores, self.id = list(scores), f"{name}:{scores!r}"

    def feedback_local(self, requests):
        return [Score(scores=self.scores[: len(r.completions)]) for r in requests]

    async def feedback(self, request):
        return self.feedback_local([request])[0]


NAN, INF = float("nan"), float("inf")


def shown(scores):
    return [None if s is None or math.isnan(s) else s for s in scores]


@pytest.mark.parametrize("bad", [NAN, INF, -INF, None])
async def test_nan_inf_none_scores_are_missing_in_every_composite_never_zero(bad):
    req = request(texts=("a", "b", "c"))
    three = Fixed([1.0, bad, 0.5])
    summed = await WeightedSum([(three, 2.0), (Fixed([0.25, 0.25, 0.25]), 1.0)]).feedback(req)
    assert shown(summed.scores) == [2.25, None, 1.25]
    gated = await Gate(Fixed([1.0, bad, 0.0], "verifier"), Fixed([0.7, 0.7, 0.7], "judge"),
                       fail_score=0.0).feedback(req)
    assert shown(gated.scores) == [0.7, None, 0.0]  # an unscored verdict is missing (NaN), not fail_score
    judged = await Gate(Fixed([1.0, 1.0, 1.0], "verifier"), three).feedback(req)
    assert shown(judged.scores) == [1.0, None, 0.5]
    local = Gate(Fixed([1.0, bad, 0.0], "verifier"), Fixed([0.7, 0.7, 0.7], "judge")).feedback_local([req])
    assert shown(local[0].scores) == [0.7, None, 0.0]
    with pytest.raises(TeacherError, match="no completion got a finite score"):
        await WeightedSum([(Fixed([bad, bad, bad]), 1.0)]).feedback(req)


async def test_preference_scores_with_a_non_finite_outcome_is_a_failure():
    class Pairs:
        id = "pairs:1"

        async def feedback(self, request):
            return Preference.model_construct(pairs=[PreferencePair.model_construct(winner=0, loser=1,
                                                                                    probability=NAN)])

    with pytest.raises(TeacherError, match="non-finite probability"):
        await PreferenceScores(Pairs()).feedback(request(texts=("a", "b")))
