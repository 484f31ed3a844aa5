"""opd_sdk.app.trl.as_reward_func: TRL's reward-function contract, failures as None (never 0.0), the cache."""

from __future__ import annotations

import pytest

from opd_sdk.app.trl import as_reward_func, to_requests
from opd_sdk.errors import TeacherError
from opd_sdk.feedback.teacher import fingerprint
from opd_sdk.types import Completion, Reference, Score
from providers.verifier import VerifierTeacher


class CountingTeacher:
    """Scores 1.0 when the completion contains 'good'; fails (non-retriable) on 'boom'."""

    def __init__(self):
        self.id = fingerprint("counting")
        self.calls = 0

    async def feedback(self, request):
        self.calls += 1
        text = request.completions[0].text
        if "boom" in text:
            raise TeacherError("judge said 400", retriable=False, status=400)
        return Score(scores=[1.0 if "good" in text else 0.25])


def test_to_requests_reads_conversational_prompts_and_columns():
    prompts = [[{"role": "user", "content": "2+2?"}]] * 2
    completions = [[{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}]]
    reqs = to_requests(prompts, completions, {"answer": [4, 4], "privileged": ["2+2=4", None]})
    assert [r.completions[0].text for r in reqs] == ["4", "5"]
    assert reqs[0].prompt[0].content == "2+2?" and reqs[0].metadata == {"answer": "4"}
    assert reqs[0].privileged == "2+2=4" and reqs[1].privileged is None


def test_verifier_reward_in_trl_signature():
    reward = as_reward_func(VerifierTeacher("numeric"))
    logged = []
    out = reward(
        prompts=["What is 3 times 4?"] * 3,
        completions=["12", "It is 13.", "3 times 4 is 12"],
        completion_ids=[[1], [2], [3]],
        answer=["12", "12", "12"],
        trainer_state=None,
        log_metric=lambda name, value: logged.append((name, value)),
        log_extra=lambda *a: None,
    )
    assert out == [1.0, 0.0, 1.0]
    assert logged == [("opd/teacher/failures", 0.0)]
    reward.collector.close()


def test_failures_become_none_and_answers_are_cached(tmp_path):
    teacher = CountingTeacher()
    reward = as_reward_func(teacher, cache=tmp_path / "c.sqlite", max_retries=0)
    kwargs = dict(prompts=["p"] * 3, completions=["good", "meh", "boom"], completion_ids=None)
    assert reward(**kwargs) == [1.0, 0.25, None]
    assert teacher.calls == 3
    assert reward(**kwargs) == [1.0, 0.25, None]
    assert teacher.calls == 4  # the two answers came from the cache; only the failure was asked again
    assert reward.collector.usage.cache_hits == 2
    reward.collector.close()


def test_non_score_feedback_is_refused():
    class RefTeacher:
        id = "ref"

        async def feedback(self, request):
            return Reference(completions=[Completion(text="x")])

    reward = as_reward_func(RefTeacher())
    with pytest.raises(Exception, match="needs Score feedback"):
        reward(prompts=["p"], completions=["c"])
    reward.collector.close()
