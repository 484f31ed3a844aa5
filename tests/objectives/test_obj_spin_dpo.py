"""SPIN and OnlineDPO: hand-worked losses, gradcheck, pair building, tiny-Llama integration."""

import math

import pytest
import torch
from objtools import tiny_tokenizer

from opd_sdk.errors import ConfigError
from opd_sdk.objectives import SPIN, OnlineDPO
from opd_sdk.objectives.online_dpo import dpo_loss, feedback_pairs
from opd_sdk.objectives.spin import spin_loss
from opd_sdk.types import (
    Completion,
    FeedbackFailure,
    Preference,
    PreferencePair,
    Reference,
    Score,
)

D = torch.float64
# pair 0: margin = (-2 - -5) - (-3 - -4) = 3 - 1 = 2; pair 1: all equal -> margin 0
PR, PG = torch.tensor([-2.0, -1.0], dtype=D), torch.tensor([-5.0, -1.0], dtype=D)
OR, OG = torch.tensor([-3.0, -1.0], dtype=D), torch.tensor([-4.0, -1.0], dtype=D)


def test_spin_loss_by_hand():
    pr = PR.clone().requires_grad_(True)
    loss, margin = spin_loss(pr, PG, OR, OG, beta=0.5, loss_type="sigmoid")
    assert margin.tolist() == [2.0, 0.0]
    # beta * margin = [1, 0]: -log sigmoid(1) = log(1 + e^-1) = 0.313262; -log sigmoid(0) = log 2
    assert loss.item() == pytest.approx((math.log1p(math.exp(-1)) + math.log(2)) / 2)
    loss.backward()
    # d/d pr = -beta * (1 - sigmoid(beta m)) / N: pair 0: -0.5 * (1 - 0.731059) / 2 = -0.0672353
    assert pr.grad[0].item() == pytest.approx(-0.5 * (1 - 1 / (1 + math.exp(-1))) / 2)
    assert pr.grad[1].item() == pytest.approx(-0.5 * 0.5 / 2)
    # hinge: max(0, 1 - 1) = 0, max(0, 1 - 0) = 1 -> mean 0.5
    assert spin_loss(PR, PG, OR, OG, beta=0.5, loss_type="hinge")[0].item() == pytest.approx(0.5)


def test_dpo_and_ipo_by_hand():
    # h = (-2 - -3) - (-5 - -4) = 2 for pair 0 (PR, OR as the winner; PG, OG as the loser)
    loss, h = dpo_loss(PR[:1], PG[:1], OR[:1], OG[:1], beta=0.5)
    assert h.item() == 2.0
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1)))  # -log sigmoid(0.5 * 2)
    # p = 0.8: 0.8 * 0.313262 + 0.2 * (-log sigmoid(-1) = 1.313262) = 0.513262
    p = torch.tensor([0.8], dtype=D)
    assert dpo_loss(PR[:1], PG[:1], OR[:1], OG[:1], 0.5, "sigmoid", p)[0].item() == pytest.approx(0.513262, abs=1e-6)
    # IPO p = 1: target (1 - .5)/.5 = 1 -> (2 - 1)^2 = 1; p = .8: target .6 -> 1.4^2 = 1.96
    assert dpo_loss(PR[:1], PG[:1], OR[:1], OG[:1], 0.5, "ipo")[0].item() == pytest.approx(1.0)
    assert dpo_loss(PR[:1], PG[:1], OR[:1], OG[:1], 0.5, "ipo", p)[0].item() == pytest.approx(1.96)


def test_gradcheck_spin_and_dpo():
    inputs = tuple(x.clone().requires_grad_(True) for x in (PR, PG, OR, OG))
    for kind in ("sigmoid", "hinge"):
        # hinge has a kink at beta*margin = 1: beta 0.3 keeps both pairs away from it
        assert torch.autograd.gradcheck(lambda a, b, c, d: spin_loss(a, b, c, d, 0.3, kind)[0], inputs)
    p = torch.tensor([0.8, 0.6], dtype=D)
    for kind in ("sigmoid", "ipo"):
        assert torch.autograd.gradcheck(lambda a, b, c, d: dpo_loss(a, b, c, d, 0.5, kind, p)[0], inputs)


def test_pairs_from_preferences_and_scores(batch):
    fb = [
        Preference(pairs=[PreferencePair(winner=1, loser=0, probability=0.9)]),
        Score(scores=[2.0, 2.0]),  # all equal: no pair
    ]
    assert feedback_pairs(batch, fb, "t") == [(1, 0, 0.9)]
    fb = [FeedbackFailure(reason="x"), Score(scores=[0.5, 1.5])]
    assert feedback_pairs(batch, fb, "t") == [(3, 2, 1.0)]
    with pytest.raises(ConfigError, match="outside"):
        feedback_pairs(batch, [Preference(pairs=[PreferencePair(winner=2, loser=0, probability=1.0)])] * 2, "t")


def test_online_dpo_learns_the_preferred_sample(model, batch):
    obj = OnlineDPO(beta=0.5)
    obj.setup(model)
    fb = [Preference(pairs=[PreferencePair(winner=1, loser=0, probability=1.0)]), FeedbackFailure(reason="x")]
    out = obj.loss(model, batch, fb)
    # policy == reference at the start: h = 0, loss = log 2
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert out.metrics["pairs"] == 1.0 and out.metrics["feedback_failures"] == 1.0
    out.loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    after = obj.loss(model, batch, fb)
    assert after.metrics["margin_mean"] > 0 and after.loss.item() < math.log(2)
    nothing = obj.loss(model, batch, [Score(scores=[1.0, 1.0])] * 2)
    assert nothing.metrics["pairs"] == 0.0 and nothing.loss.item() == 0.0
    nothing.loss.backward()


def test_spin_self_play_and_opponent_refresh(model):
    from objtools import EOS, build_batch

    batch = build_batch(model, [[5, 6, 7], [8, 9]], [[10, 11, EOS], [12, EOS], [13, EOS], [EOS]], 2,
                        answers=["the answer is 7", "1 + 1 = 2"])
    obj = SPIN(tiny_tokenizer(), source="answer", beta=0.5, refresh_every=2)
    assert obj.feedback_kinds == ()
    obj.setup(model)
    out = obj.loss(model, batch, None)
    # opponent == student at the start of an iteration: every margin is 0, loss = log 2
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert out.metrics["pairs"] == 4.0 and out.metrics["margin_mean"] == pytest.approx(0.0, abs=1e-5)
    out.loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    obj.after_step(1, model)  # not a multiple of 2: the opponent stays
    moved = obj.loss(model, batch, None)
    assert moved.metrics["margin_mean"] > 0 and moved.loss.item() < math.log(2)
    obj.after_step(2, model)  # new iteration: the opponent is the current student
    assert obj.refreshes == 1
    assert obj.loss(model, batch, None).metrics["margin_mean"] == pytest.approx(0.0, abs=1e-5)


def test_spin_with_teacher_references(model, batch):
    obj = SPIN(tiny_tokenizer(), source="reference", loss_type="hinge")
    obj.setup(model)
    fb = [Reference(completions=[Completion(text="the answer is 7")]), FeedbackFailure(reason="timeout")]
    out = obj.loss(model, batch, fb)
    # only group 0's two samples are paired; hinge at margin 0 = 1
    assert out.metrics["pairs"] == 2.0 and out.metrics["feedback_failures"] == 1.0
    assert out.loss.item() == pytest.approx(1.0, abs=1e-6)
    out.loss.backward()
    with pytest.raises(ConfigError, match="reference"):
        obj.loss(model, batch, [Score(scores=[1.0, 0.0])] * 2)


def test_spin_skips_a_sample_identical_to_the_real_answer(model):
    from objtools import EOS, build_batch

    # "the answer is 7" = [14, 15, 16, 11] + EOS: sample 0 of prompt 0 wrote exactly that
    batch = build_batch(model, [[5, 6, 7]], [[14, 15, 16, 11, EOS], [12, EOS]], 2, answers=["the answer is 7"])
    obj = SPIN(tiny_tokenizer(), source="answer")
    obj.setup(model)
    out = obj.loss(model, batch, [])
    assert out.metrics["identical_skipped"] == 1.0 and out.metrics["pairs"] == 1.0
