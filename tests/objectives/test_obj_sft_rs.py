"""SFT and RejectionSampling on a tiny Llama: answers and references, selection rules
(the NLL itself: tests/losses/test_nll.py)."""

import pytest
import torch
from objtools import EOS, build_batch, seq_logprobs, tiny_tokenizer

from opd_sdk.errors import ConfigError
from opd_sdk.objectives import SFT, RejectionSampling
from opd_sdk.objectives.rejection_sampling import select_best
from opd_sdk.rollout.logprobs import selected_logprobs
from opd_sdk.types import Completion, FeedbackFailure, Reference, Score


def test_sft_on_answers(model):
    tok = tiny_tokenizer()
    batch = build_batch(model, [[5, 6, 7], [8, 9]], [[10, EOS], [12, EOS], [13, EOS], [EOS]], 2,
                        answers=["the answer is 7", None])
    out = SFT(tok).loss(model, batch, None)
    # the answer row is the prompt [5, 6, 7] + [14, 15, 16, 11, EOS]; NLL over those 5 tokens
    row = torch.tensor([[5, 6, 7, 14, 15, 16, 11, 1]])
    with torch.no_grad():
        lp = selected_logprobs(model, row, torch.ones_like(row))
    assert out.loss.item() == pytest.approx(-lp[0, 3:].sum().item() / 5, rel=1e-5)
    assert out.metrics["objective/missing_answers"] == 1.0 and out.metrics["objective/examples"] == 1.0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = out.loss.item()
    for _ in range(3):
        opt.zero_grad()
        SFT(tok).loss(model, batch, None).loss.backward()
        opt.step()
    assert SFT(tok).loss(model, batch, None).loss.item() < first


def test_sft_on_reference_feedback_ignores_teacher_token_ids(model, batch):
    tok = tiny_tokenizer()
    fb = [Reference(completions=[Completion(text="the answer is 7", token_ids=[999])]), FeedbackFailure(reason="x")]
    obj = SFT(tok, source="reference")
    assert obj.feedback_kinds == ("reference",)
    out = obj.loss(model, batch, fb)
    assert out.metrics["objective/tokens"] == 5.0  # group 1 failed: only group 0's reference is learned
    out.loss.backward()
    all_failed = obj.loss(model, batch, [FeedbackFailure(reason="x")] * 2)
    assert all_failed.loss.item() == 0.0
    all_failed.loss.backward()


def test_sft_without_any_answer_is_a_clear_error(model, batch):
    with pytest.raises(ConfigError, match="PromptItem.answer"):
        SFT(tiny_tokenizer()).loss(model, batch, None)


R = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 5.0, -1.0]])
V = torch.tensor([[True, True, True, True], [True, True, False, True]])


def test_select_best_rules():
    # top-1: group 0 tie 3 vs 3 -> earlier (index 1); group 1: the 5 is invalid, tie 2 vs 2 -> index 0
    assert select_best(R, V, 1, None).tolist() == [[False, True, False, False], [True, False, False, False]]
    assert select_best(R, V, 2, None).tolist() == [[False, True, True, False], [True, True, False, False]]
    assert select_best(R, V, None, 2.0).tolist() == [[False, True, True, False], [True, True, False, False]]
    # threshold 2.5 then top-1: group 0 keeps index 1, group 1 keeps nothing
    assert select_best(R, V, 1, 2.5).tolist() == [[False, True, False, False], [False, False, False, False]]
    with pytest.raises(ConfigError):
        select_best(R, V, None, None)


def test_rejection_sampling_is_nll_of_the_kept_rows(model, batch):
    # best of each group: row 1 (2 tokens) and row 2 (4 tokens)
    out = RejectionSampling(top_k=1).loss(model, batch, [Score(scores=[0.0, 1.0]), Score(scores=[1.0, 0.0])])
    s = seq_logprobs(model, batch)
    assert out.loss.item() == pytest.approx(-(s[1] + s[2]).item() / 6, rel=1e-5)
    assert out.metrics["objective/selected"] == 2.0 and out.metrics["objective/selected_reward_mean"] == 1.0
    out.loss.backward()
    out = RejectionSampling(top_k=None, threshold=0.5).loss(
        model, batch, [Score(scores=[0.0, 1.0]), FeedbackFailure(reason="x")]
    )
    assert out.loss.item() == pytest.approx(-s[1].item() / 2, rel=1e-5)
    assert out.metrics["objective/selected"] == 1.0
    none = RejectionSampling(threshold=5.0).loss(model, batch, [Score(scores=[0.0, 1.0])] * 2)
    assert none.loss.item() == 0.0 and none.metrics["objective/selected"] == 0.0
