"""Hybrid: the weighted sum of its terms, feedback routing by source, delegation of setup/after_step/state."""

import pytest
import torch
from objtools import tiny_tokenizer

from opd_sdk.errors import ConfigError
from opd_sdk.objectives import (
    OBJECTIVES,
    SFT,
    SPIN,
    Hybrid,
    Objective,
    RewardWeighted,
    TokenDistill,
)
from opd_sdk.types import FeedbackFailure, Score, TokenLogprobs

TOKENS = [TokenLogprobs(logprobs=[[-1.0, -2.0, -0.5], [-1.5, -0.1]]), TokenLogprobs(logprobs=[[-1.0] * 4, [-3.0]])]
SCORES = [Score(scores=[1.0, 0.0]), FeedbackFailure(reason="judge down")]


def test_weighted_sum_of_a_token_and_a_sequence_term(model, batch):
    token, seq = TokenDistill(), RewardWeighted(advantage="rloo")
    hybrid = Hybrid([(token, 0.7, 0), (seq, 0.3, 1)])
    assert hybrid.feedback_sources == 2 and hybrid.feedback_kinds == ("token_logprobs", "score")
    hybrid.setup(model)
    out = hybrid.loss(model, batch, list(zip(TOKENS, SCORES)))
    a = token.loss(model, batch, TOKENS).loss.item()
    b = seq.loss(model, batch, SCORES).loss.item()
    # 0.7 * token loss + 0.3 * sequence loss
    assert out.loss.item() == pytest.approx(0.7 * a + 0.3 * b, rel=1e-5)
    assert out.metrics["objective/tokendistill/tokens"] == 10.0
    assert out.metrics["objective/rewardweighted/valid_samples"] == 2.0
    # each term's own loss, before its weight, and the total
    assert out.metrics["objective/tokendistill/loss"] == pytest.approx(a, rel=1e-5)
    assert out.metrics["objective/rewardweighted/loss"] == pytest.approx(b, rel=1e-5)
    assert out.metrics["loss/total"] == pytest.approx(0.7 * a + 0.3 * b, rel=1e-5)
    out.loss.backward()
    with pytest.raises(ConfigError, match="zip"):
        hybrid.loss(model, batch, TOKENS)


def test_one_source_with_an_sft_anchor(model):
    from objtools import EOS, build_batch

    batch = build_batch(model, [[5, 6, 7], [8, 9]], [[10, EOS], [12, EOS], [13, EOS], [EOS]], 2,
                        answers=["the answer is 7", "2"])
    sft = SFT(tiny_tokenizer())
    hybrid = Hybrid([(RewardWeighted(), 1.0), (sft, 0.5)])
    fb = [Score(scores=[1.0, 0.0]), Score(scores=[0.0, 1.0])]
    out = hybrid.loss(model, batch, fb)
    pg = RewardWeighted().loss(model, batch, fb).loss.item()
    assert out.loss.item() == pytest.approx(pg + 0.5 * sft.loss(model, batch, fb).loss.item(), rel=1e-5)


def test_delegates_setup_after_step_and_state(model, batch):
    spin = SPIN(tiny_tokenizer(), source="answer", refresh_every=1)
    hybrid = Hybrid([(spin, 1.0), (RewardWeighted(), 1.0)], names=["spin", "pg"])
    hybrid.setup(model)
    assert spin.opponent is not None
    hybrid.after_step(1, model)
    assert spin.refreshes == 1
    state = hybrid.state_dict()
    assert set(state) == {"spin"} and state["spin"]["refreshes"] == 1
    again = SPIN(tiny_tokenizer(), source="answer")
    again.setup(model)
    Hybrid([(again, 1.0)], names=["spin"]).load_state_dict(state)
    assert again.refreshes == 1


def test_registry_and_protocol():
    assert OBJECTIVES["reward_weighted"] is RewardWeighted and OBJECTIVES["hybrid"] is Hybrid
    assert set(OBJECTIVES) == {"reward_weighted", "rejection_sampling", "sft", "spin", "online_dpo",
                               "token_distill", "hybrid"}
    assert isinstance(RewardWeighted(), Objective) and isinstance(TokenDistill(), Objective)
    with pytest.raises(ConfigError):
        Hybrid([])
    with pytest.raises(ConfigError, match="distinct"):
        Hybrid([(RewardWeighted(), 1.0)], names=["a", "b"])


def test_spin_opponent_survives_a_checkpoint(model, batch):
    spin = SPIN(tiny_tokenizer(), source="answer")
    spin.setup(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    spin.refresh_opponent(model)
    state = spin.state_dict()
    fresh = SPIN(tiny_tokenizer(), source="answer")
    from objtools import tiny_llama

    fresh.setup(tiny_llama(3))
    fresh.load_state_dict(state)
    for a, b in zip(fresh.opponent.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert fresh.refreshes == 1
