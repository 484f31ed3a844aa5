"""Every objective through `batch_loss` (opd_sdk.train.microbatch): micro-batching gives the one-big-batch gradient and metrics,
and a Hybrid of several terms costs one policy forward."""

from __future__ import annotations

import pytest
import torch
from objtools import EOS, build_batch, tiny_llama, tiny_tokenizer
from test_obj_token_distill import teacher_feedback

from opd_sdk.objectives import (
    SFT,
    SPIN,
    Hybrid,
    OnlineDPO,
    RejectionSampling,
    RewardWeighted,
    TokenDistill,
)
from opd_sdk.train.microbatch import batch_loss
from opd_sdk.types import FeedbackFailure, Preference, PreferencePair, Score

# 3 prompts x 2 samples of different lengths; prompt 1 is shorter (left padding)
PROMPTS = [[5, 6, 7], [8, 9], [4, 5, 6]]
COMPLETIONS = [[10, 11, EOS], [12, EOS], [13, 14, 15, EOS], [EOS], [16, 17, 18, 19, 11, EOS], [12, 13, EOS]]
ANSWERS = ["the answer is 7", "2", "3 + 4"]
SCORES = [Score(scores=[1.0, 0.0]), Score(scores=[0.2, 0.9]), Score(scores=[0.0, 0.5])]
PREFS = [Preference(pairs=[PreferencePair(winner=1, loser=0, probability=0.8)]), FeedbackFailure(reason="down"),
         Preference(pairs=[PreferencePair(winner=0, loser=1, probability=1.0)])]


def objectives(tokens):
    tok = tiny_tokenizer()
    return {
        "rloo_token": (RewardWeighted(), SCORES),
        "grpo_sequence_clip_kl": (RewardWeighted(advantage="grpo", normalisation="sequence", clip_eps=0.2, beta=0.1), SCORES),
        "kl_in_reward": (RewardWeighted(advantage="rloo", beta=0.1, kl_estimator="k1", kl_penalty="reward"), SCORES),
        "token_distill_pg": (TokenDistill(gamma=0.5), tokens),
        "token_distill_jsd": (TokenDistill(divergence="jsd"), tokens),
        "online_dpo": (OnlineDPO(), PREFS),
        "spin": (SPIN(tok, source="answer"), None),
        "sft": (SFT(tok), None),
        "rejection_sampling": (RejectionSampling(top_k=1), SCORES),
        "hybrid": (Hybrid([(TokenDistill(), 1.0, 0), (RewardWeighted(), 0.5, 1), (SFT(tok), 0.1, 0)]),
                   list(zip(tokens, SCORES))),
    }


def grads_and_metrics(objective, feedback, micro):
    model = tiny_llama(0)
    with torch.no_grad():  # the policy a little away from the frozen copies, so KL / margins are not 0
        frozen = tiny_llama(0)
    objective.setup(frozen)
    batch = build_batch(model, PROMPTS, COMPLETIONS, 2, answers=ANSWERS)
    out = batch_loss(objective, model, batch, feedback, micro_batch_prompts=micro, backward=True)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, out


@pytest.mark.parametrize("name", list(objectives([None] * 3)))
def test_micro_batches_give_the_one_batch_gradient_and_metrics(name):
    tokens = teacher_feedback(tiny_llama(1), build_batch(tiny_llama(0), PROMPTS, COMPLETIONS, 2), 4)
    whole_obj, feedback = objectives(tokens)[name]
    split_obj, _ = objectives(tokens)[name]
    whole, whole_out = grads_and_metrics(whole_obj, feedback, None)
    split, split_out = grads_and_metrics(split_obj, feedback, 1)
    assert whole and whole.keys() == split.keys()
    assert sum(float(g.abs().sum()) for g in whole.values()) > 0
    for n in whole:
        assert torch.allclose(whole[n], split[n], atol=1e-6, rtol=0), n
    assert whole_out.loss == pytest.approx(split_out.loss, abs=1e-6)
    assert whole_out.metrics["forward/policy_passes"] == 1
    passes = split_out.metrics["forward/policy_passes"]
    assert passes == (2 if name == "online_dpo" else 3)  # DPO's group 1 failed: not run
    for key, value in whole_out.metrics.items():  # counters are summed, means are means
        if key not in ("forward/policy_passes", "forward/max_importance_ratio"):
            assert split_out.metrics[key] == pytest.approx(value, abs=1e-5), key


def test_counters_by_hand():
    _, out = grads_and_metrics(RewardWeighted(), SCORES, 1)
    assert out.metrics["objective/tokens"] == 3 + 2 + 4 + 1 + 6 + 3 and out.metrics["objective/valid_samples"] == 6
    _, out = grads_and_metrics(OnlineDPO(), PREFS, 1)
    assert out.metrics["objective/pairs"] == 2  # group 1 failed: its pair is not counted


def test_hybrid_costs_one_policy_forward():
    """Counting the policy trunk's calls: a Hybrid of three terms runs it as often as one term."""
    tokens = teacher_feedback(tiny_llama(1), build_batch(tiny_llama(0), PROMPTS, COMPLETIONS, 2), 4)

    def trunk_calls(objective, feedback):
        model = tiny_llama(0)
        calls = []
        model.model.register_forward_hook(lambda *a: calls.append(1))
        objective.setup(model)
        batch_loss(objective, model, build_batch(model, PROMPTS, COMPLETIONS, 2, answers=ANSWERS), feedback)
        return len(calls)

    tok = tiny_tokenizer()
    hybrid = Hybrid([(TokenDistill(), 1.0, 0), (TokenDistill(divergence="jsd"), 1.0, 0), (RewardWeighted(), 0.5, 1)])
    single = trunk_calls(RewardWeighted(beta=0.0), [Score(scores=[1.0, 0.5])] * 3)
    assert trunk_calls(hybrid, list(zip(tokens, SCORES))) == single >= 1
    with_text = Hybrid([(RewardWeighted(), 1.0), (SFT(tok), 0.1)])
    assert trunk_calls(with_text, SCORES) <= single


def test_flat_groups_have_exactly_zero_advantage_and_no_signal():
    model = tiny_llama(0)
    batch = build_batch(model, PROMPTS, COMPLETIONS, 2)
    flat = [Score(scores=[0.7, 0.7 + 1e-9])] * 3
    obj = RewardWeighted(advantage="grpo")
    out = batch_loss(obj, model, batch, flat, flat_tolerance=1e-6)
    assert out.signal == 0 and out.metrics["objective/flat_groups"] == 3 and out.metrics["forward/policy_passes"] == 0
    plan = obj.plan(batch, flat, __import__("opd_sdk.objectives.base", fromlist=["PlanContext"]).PlanContext(1e-6))
    assert torch.count_nonzero(plan.data["advantages_B"]) == 0 and not plan.rows_B.any()
