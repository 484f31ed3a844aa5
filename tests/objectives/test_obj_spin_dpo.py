"""SPIN and OnlineDPO on a tiny Llama: learning the preferred sample, self-play and opponent refresh,
teacher references (the losses themselves: tests/losses/test_preference.py)."""

import math

import pytest
import torch
from objtools import tiny_tokenizer

from opd_sdk.errors import ConfigError
from opd_sdk.objectives import SPIN, OnlineDPO
from opd_sdk.types import (
    Completion,
    FeedbackFailure,
    Preference,
    PreferencePair,
    Reference,
    Score,
)


def test_online_dpo_learns_the_preferred_sample(model, batch):
    obj = OnlineDPO(beta=0.5)
    obj.setup(model)
    fb = [Preference(pairs=[PreferencePair(winner=1, loser=0, probability=1.0)]), FeedbackFailure(reason="x")]
    out = obj.loss(model, batch, fb)
    # policy == reference at the start: h = 0, loss = log 2
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert out.metrics["objective/pairs"] == 1.0  # group 1 failed: no pair
    out.loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    after = obj.loss(model, batch, fb)
    assert after.metrics["objective/margin_mean"] > 0 and after.loss.item() < math.log(2)
    nothing = obj.loss(model, batch, [Score(scores=[1.0, 1.0])] * 2)
    assert nothing.metrics["objective/pairs"] == 0.0 and nothing.loss.item() == 0.0
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
    assert out.metrics["objective/pairs"] == 4.0
    assert out.metrics["objective/margin_mean"] == pytest.approx(0.0, abs=1e-5)
    out.loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    obj.after_step(1, model)  # not a multiple of 2: the opponent stays
    moved = obj.loss(model, batch, None)
    assert moved.metrics["objective/margin_mean"] > 0 and moved.loss.item() < math.log(2)
    obj.after_step(2, model)  # new iteration: the opponent is the current student
    assert obj.refreshes == 1
    assert obj.loss(model, batch, None).metrics["objective/margin_mean"] == pytest.approx(0.0, abs=1e-5)


def test_spin_with_teacher_references(model, batch):
    obj = SPIN(tiny_tokenizer(), source="reference", loss_type="hinge")
    obj.setup(model)
    fb = [Reference(completions=[Completion(text="the answer is 7")]), FeedbackFailure(reason="timeout")]
    out = obj.loss(model, batch, fb)
    # only group 0's two samples are paired; hinge at margin 0 = 1
    assert out.metrics["objective/pairs"] == 2.0
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
    assert out.metrics["objective/identical_skipped"] == 1.0 and out.metrics["objective/pairs"] == 1.0
