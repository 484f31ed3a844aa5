"""train/collect.py: a batch's feedback over its collectors, their usage, and what is refused before training."""

from __future__ import annotations

import threading

import pytest
import torch

from opd_sdk.data import PromptItem
from opd_sdk.errors import ConfigError
from opd_sdk.feedback.factory import make_collector
from opd_sdk.objectives import RewardWeighted
from opd_sdk.rollout.batch import RolloutBatch
from opd_sdk.train.collect import check_collectors, collect, usage_total
from opd_sdk.types import Completion, Score
from providers import WeightedSum


class Length:
    """Score = completion length; records the thread that asked it. Local (in process) or remote."""

    def __init__(self, local: bool, cacheable: bool = True) -> None:
        self.id, self.local, self.cacheable, self.threads = f"length:{local}:{cacheable}", local, cacheable, []

    def _score(self, request) -> Score:
        self.threads.append(threading.current_thread().name)
        return Score(scores=[float(len(c.text)) for c in request.completions])

    async def feedback(self, request) -> Score:
        return self._score(request)

    def feedback_local(self, requests) -> list[Score]:
        return [self._score(r) for r in requests]


def batch_of(texts: list[str]) -> RolloutBatch:
    """Two prompts, one completion each (token ids are not read by these teachers)."""
    B, T = len(texts), 3
    return RolloutBatch(
        prompts=[PromptItem(prompt=f"p{i}") for i in range(B)], group_size=1,
        input_ids_BT=torch.ones(B, T, dtype=torch.long), attention_mask_BT=torch.ones(B, T, dtype=torch.long),
        completion_mask_BT=torch.zeros(B, T), sampler_logprobs_BT=torch.zeros(B, T), prompt_len=1,
        completions=[Completion(text=t) for t in texts],
    )


def test_in_process_collectors_run_on_the_calling_thread_the_others_beside_it():
    local, remote = Length(local=True), Length(local=False)
    collectors = [make_collector(local), make_collector(remote, progress=False), make_collector(Length(local=True))]
    try:
        feedback = collect(collectors, batch_of(["ab", "abcd"]), None)
        assert [[fb.scores for fb in per_prompt] for per_prompt in feedback] == [[[2.0]] * 3, [[4.0]] * 3]
        here = threading.current_thread().name
        assert local.threads == [here, here] and here not in remote.threads
        assert usage_total(collectors, "requests_sent") == 2 + 2 + 2  # one request per prompt, each collector
        assert usage_total([], "requests_sent") is None
    finally:
        for c in collectors:
            c.close()


@pytest.mark.parametrize("local", [True, False])
def test_a_teacher_that_follows_the_student_is_refused_with_max_staleness(local):
    following = Length(local, cacheable=False)  # its answers change as the student trains
    for teacher in (following, WeightedSum([(Length(local), 1.0), (following, 1.0)])):
        with make_collector(teacher, progress=False) as collector:
            with pytest.raises(ConfigError, match=rf"teacher {following.id} follows the student's weights.*"
                                                  r"set max_staleness: 0"):
                check_collectors(RewardWeighted(), [collector], None, max_staleness=1)
            check_collectors(RewardWeighted(), [collector], None, max_staleness=0)  # asked before its step
    with make_collector(Length(local), progress=False) as collector:  # does not follow the student
        check_collectors(RewardWeighted(), [collector], None, max_staleness=2)
