"""TokenDistill on a tiny Llama: support log-probs, the exact KL on a full support, training towards a
teacher (the divergences themselves: tests/losses/test_token_divergence.py)."""

import pytest
import torch
from objtools import VOCAB, tiny_llama

from opd_sdk.errors import ConfigError
from opd_sdk.objectives import TokenDistill
from opd_sdk.rollout.logprobs import sequence_logprobs
from opd_sdk.tensors.targets import teacher_support, teacher_token_logprobs
from opd_sdk.types import FeedbackFailure, TokenLogprobs


def full_logits(model, batch):
    position_ids = (batch.attention_mask_BT.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT, position_ids=position_ids).logits


def teacher_feedback(teacher, batch, k):
    """TokenLogprobs from a local teacher model: sampled-token log-probs and its top-k per position."""
    with torch.no_grad():
        logp_BTV = torch.log_softmax(full_logits(teacher, batch), -1)
    out, G, L = [], batch.group_size, batch.prompt_len
    for p in range(len(batch.prompts)):
        lps, tops = [], []
        for b in range(p * G, p * G + G):
            n = int(batch.completion_mask_BT[b].sum())
            cols = range(L, L + n)
            lps.append([float(logp_BTV[b, c - 1, batch.input_ids_BT[b, c]]) for c in cols])
            tops.append([{int(i): float(v) for v, i in zip(*logp_BTV[b, c - 1].topk(k))} for c in cols])
        out.append(TokenLogprobs(logprobs=lps, top_k=tops))
    return out


def test_support_logprobs_match_the_full_softmax(model, batch):
    fb = teacher_feedback(tiny_llama(1), batch, 5)
    tok = teacher_token_logprobs(batch, fb, "t")
    sup = teacher_support(batch, fb, tok, VOCAB, "t")
    with torch.no_grad():
        out = sequence_logprobs(model, batch.input_ids_BT, batch.attention_mask_BT, support=sup,
                                from_col=batch.prompt_len, chunk_rows=1)
        lp_MK, tail_M = out.support_MK, out.log_tail_M
        full = torch.log_softmax(full_logits(model, batch), -1)
    full_MV = full[sup.rows_M, sup.cols_M - 1].double()
    assert torch.allclose(lp_MK[sup.mask_MK].double(), full_MV.gather(-1, sup.ids_MK)[sup.mask_MK], atol=1e-5)
    inside_M = torch.where(sup.mask_MK, full_MV.gather(-1, sup.ids_MK).exp(), 0.0).sum(-1)
    assert torch.allclose(tail_M.double().exp(), 1.0 - inside_M, atol=1e-5)
    assert sup.mask_MK.sum(-1).min() >= 5  # top-5, plus the sampled token when it is not among them


def test_full_vocabulary_support_gives_the_exact_kl(model, batch):
    teacher = tiny_llama(1)
    fb = teacher_feedback(teacher, batch, VOCAB)  # "top-k" = the whole distribution: both tails ~0
    out = TokenDistill(divergence="forward_kl").loss(model, batch, fb)
    with torch.no_grad():
        t, s = torch.log_softmax(full_logits(teacher, batch), -1), torch.log_softmax(full_logits(model, batch), -1)
    mask = batch.completion_mask_BT[:, 1:].bool()
    exact = (t.exp() * (t - s)).sum(-1)[:, :-1][mask].mean()
    assert out.loss.item() == pytest.approx(exact.item(), abs=1e-4)


@pytest.mark.parametrize("divergence", ["reverse_kl_pg", "forward_kl", "reverse_kl", "jsd", "tv"])
def test_training_moves_the_student_towards_the_teacher(model, batch, divergence):
    teacher = tiny_llama(1)
    fb = teacher_feedback(teacher, batch, 4)
    fb[1] = FeedbackFailure(reason="timeout")
    obj = TokenDistill(divergence=divergence)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(5):
        out = obj.loss(model, batch, fb)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else out.metrics
    last = obj.loss(model, batch, fb).metrics
    key = "objective/" + ("reverse_kl" if divergence == "reverse_kl_pg" else divergence)
    assert last[key] < first[key]
    assert last["objective/tokens"] == 5.0  # group 1 failed: only group 0's 5 tokens


def test_top_k_divergence_without_top_k_is_a_clear_error(model, batch):
    fb = [TokenLogprobs(logprobs=[[-1.0, -1.0, -1.0], [-1.0, -1.0]]), TokenLogprobs(logprobs=[[-1.0] * 4, [-1.0]])]
    with pytest.raises(ConfigError, match="top_k"):
        TokenDistill(divergence="jsd").loss(model, batch, fb)
    assert TokenDistill().loss(model, batch, fb).metrics["objective/tokens"] == 10.0
