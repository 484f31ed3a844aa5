"""RewardWeighted on a tiny Llama: advantages move probability, failures and missing scores are masked,
the KL to a reference (the losses themselves: tests/losses/)."""

import pytest
import torch
from objtools import EOS, build_batch, seq_logprobs

from opd_sdk.errors import ConfigError
from opd_sdk.losses.policy_gradient import policy_gradient_loss
from opd_sdk.objectives import RewardWeighted
from opd_sdk.types import FeedbackFailure, Preference, PreferencePair, Score


def test_one_step_moves_probability_towards_higher_reward(model, batch):
    obj = RewardWeighted(advantage="rloo")
    obj.setup(model)
    feedback = [Score(scores=[1.0, 0.0]), Score(scores=[0.0, 1.0])]
    before = seq_logprobs(model, batch)
    out = obj.loss(model, batch, feedback)
    # RLOO with G=2: advantages [1, -1, -1, 1]; no reference model when beta = 0
    assert obj.reference is None
    assert out.metrics["objective/advantage_abs_mean"] == 1.0 and out.metrics["objective/valid_samples"] == 4.0
    assert "objective/kl" not in out.metrics and "objective/advantage_abs_mean" in out.metrics
    out.loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
    delta = seq_logprobs(model, batch) - before
    assert delta[0] > 0 and delta[1] < 0 and delta[2] < 0 and delta[3] > 0


def test_failed_group_is_masked_and_counted(model, batch):
    obj = RewardWeighted(advantage="rloo")
    out = obj.loss(model, batch, [Score(scores=[1.0, 0.0]), FeedbackFailure(reason="timeout")])
    assert out.metrics["objective/valid_samples"] == 2.0 and out.metrics["objective/missing_scores"] == 0.0
    out.loss.backward()
    grad_mixed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    # the same group alone (prompt 0 only) must give the same gradient: the failed group adds nothing
    only0 = build_batch(model, [[5, 6, 7]], [[10, 11, EOS], [12, EOS]], group_size=2)
    obj.loss(model, only0, [Score(scores=[1.0, 0.0])]).loss.backward()
    for a, p in zip(grad_mixed, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)


def test_all_failed_gives_zero_loss_that_backprops(model, batch):
    out = RewardWeighted().loss(model, batch, [FeedbackFailure(reason="x")] * 2)
    assert out.loss.item() == 0.0 and out.metrics["objective/valid_samples"] == 0.0
    out.loss.backward()  # must not raise


def test_kl_to_reference_is_zero_at_start_then_positive(model, batch):
    obj = RewardWeighted(advantage="grpo", beta=0.1, kl_estimator="k3", clip_eps=0.2)
    obj.setup(model)
    fb = [Score(scores=[1.0, 0.0]), Score(scores=[0.0, 1.0])]
    out = obj.loss(model, batch, fb)
    assert out.metrics["objective/kl"] == 0.0 and out.metrics["objective/clip_fraction"] == 0.0
    out.loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    # the batch is reused: the policy moved away from the sampler and the reference
    again = obj.loss(model, batch, fb).metrics
    assert again["objective/kl"] > 0.0 and again["objective/clip_fraction"] > 0.0


def test_kl_in_reward_and_k1(model, batch):
    """kl_penalty="reward": A = (r - beta * sum_t k1_t) - batch mean; the loss value is -sum_b A_b n_b / N."""
    obj = RewardWeighted(advantage="reinforce", beta=0.1, kl_estimator="k1", kl_penalty="reward")
    obj.setup(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = obj.loss(model, batch, [Score(scores=[1.0, 0.0]), Score(scores=[0.0, 1.0])])
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    kl_sum = (seq_logprobs(model, batch) - seq_logprobs(obj.reference, batch)).double()  # k1 summed per row
    n = batch.completion_mask_BT.sum(-1).double()

    def loss_for(r):
        return float(-((r - r.mean()) * n).sum() / n.sum())

    assert out.metrics["objective/kl"] != 0.0
    assert out.loss.item() == pytest.approx(loss_for(rewards - 0.1 * kl_sum), abs=1e-6)
    assert abs(loss_for(rewards - 0.1 * kl_sum) - loss_for(rewards)) > 1e-4  # the penalty is not ignored


def test_bad_feedback_is_a_clear_error(model, batch):
    obj = RewardWeighted()
    with pytest.raises(ConfigError, match="score"):
        obj.loss(model, batch, [Preference(pairs=[PreferencePair(winner=0, loser=1, probability=1.0)])] * 2)
    with pytest.raises(ConfigError, match="2 completions"):
        obj.loss(model, batch, [Score(scores=[1.0]), Score(scores=[1.0, 0.0])])
    with pytest.raises(ConfigError, match="one Feedback per prompt"):
        obj.loss(model, batch, [Score(scores=[1.0, 0.0])])
    with pytest.raises(ConfigError):
        RewardWeighted(clip_eps=2.0)


@pytest.mark.parametrize("normalisation", ["token", "sequence"])
@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_skipping_zero_advantage_rows_changes_nothing(model, batch, normalisation, clip_eps):
    # group 0 has equal rewards (RLOO advantages 0, 0): its rows are not run, but still count in the normaliser
    fb = [Score(scores=[1.0, 1.0]), Score(scores=[0.0, 1.0])]
    obj = RewardWeighted(advantage="rloo", normalisation=normalisation, clip_eps=clip_eps)
    out = obj.loss(model, batch, fb)
    assert out.metrics["objective/active_samples"] == 2.0 and out.metrics["objective/valid_samples"] == 4.0
    out.loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    # the same loss over all four rows with the pure function: advantages [0, 0, -1, 1]
    from opd_sdk.rollout.logprobs import selected_logprobs

    full, _ = policy_gradient_loss(
        selected_logprobs(model, batch.input_ids_BT, batch.attention_mask_BT),
        torch.tensor([0.0, 0.0, -1.0, 1.0]),
        batch.completion_mask_BT,
        old_logprobs_BT=batch.sampler_logprobs_BT if clip_eps else None,
        clip_eps=clip_eps,
        normalisation=normalisation,
    )
    assert out.loss.item() == pytest.approx(full.item(), rel=1e-5, abs=1e-7)
    full.backward()
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_equal_rewards_everywhere_skip_the_forward(model, batch):
    out = RewardWeighted(advantage="grpo").loss(model, batch, [Score(scores=[1.0, 1.0]), Score(scores=[0.0, 0.0])])
    assert out.loss.item() == 0.0 and out.metrics["objective/active_samples"] == 0.0
    assert out.metrics["optim/signal"] == 0
    out.loss.backward()


def test_a_missing_score_masks_its_completion_and_is_counted(model, batch):
    """A NaN score (a pointwise call that failed) masks that completion only; RLOO then has no baseline
    for the group's other member (advantage 0), so only group 1 is run."""
    out = RewardWeighted().loss(model, batch, [Score(scores=[1.0, float("nan")]), Score(scores=[0.0, 1.0])])
    assert out.metrics["objective/missing_scores"] == 1.0 and out.metrics["objective/valid_samples"] == 3.0
    assert out.metrics["objective/active_samples"] == 2.0


def test_recompute_head_gives_the_same_gradient(model, batch):
    fb = [Score(scores=[1.0, 0.0]), Score(scores=[0.0, 1.0])]
    RewardWeighted().loss(model, batch, fb).loss.backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    RewardWeighted(recompute_head=True).loss(model, batch, fb).loss.backward()
    for g, p in zip(plain, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)
