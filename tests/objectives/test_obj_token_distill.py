"""TokenDistill: bucket divergences and reverse-KL policy gradient by hand, gradcheck, alignment, tiny-Llama runs."""

import math

import pytest
import torch
from objtools import VOCAB, tiny_llama

from opd_sdk.errors import ConfigError, TokenizationMismatch
from opd_sdk.objectives import TokenDistill
from opd_sdk.objectives.token_distill import (
    bucket_divergence,
    discounted_returns,
    reverse_kl_pg_loss,
)
from opd_sdk.rollout.logprobs import sequence_logprobs
from opd_sdk.tensors.targets import teacher_support, teacher_token_logprobs
from opd_sdk.types import FeedbackFailure, Score, TokenLogprobs

D = torch.float64
# one position; teacher top-2 probs [.5, .3] -> teacher tail .2; student [.25, .25] -> student tail .5
T_LP = torch.log(torch.tensor([[0.5, 0.3]], dtype=D))
S_LP = torch.log(torch.tensor([[0.25, 0.25]], dtype=D))
S_TAIL = torch.log(torch.tensor([0.5], dtype=D))
ON = torch.ones(1, 2, dtype=torch.bool)


@pytest.mark.parametrize(
    "divergence, beta, expected",
    [
        # .5 ln(.5/.25) + .3 ln(.3/.25) + .2 ln(.2/.5) = .346574 + .054697 - .183258
        ("forward_kl", 0.5, 0.218012),
        # .25 ln(.25/.5) + .25 ln(.25/.3) + .5 ln(.5/.2) = -.173287 - .045580 + .458145
        ("reverse_kl", 0.5, 0.239278),
        # 1/2 (|.5-.25| + |.3-.25| + |.2-.5|) = 1/2 (.25 + .05 + .3)
        ("tv", 0.5, 0.3),
        # M = [.375, .275, .35]: KL(P||M) = .058021, KL(Q||M) = .053144, mean = .055582
        ("jsd", 0.5, 0.055582),
        # M = .2P + .8Q = [.3, .26, .44]: KL(P||M) = .140652, KL(Q||M) = .008531; .2*.140652 + .8*.008531
        ("jsd", 0.2, 0.034955),
    ],
)
def test_bucket_divergences_by_hand(divergence, beta, expected):
    out = bucket_divergence(T_LP, S_LP, S_TAIL, ON, divergence, beta)
    assert out.item() == pytest.approx(expected, abs=2e-6)
    # a padded third support entry (mask False, arbitrary values) changes nothing
    pad_t = torch.cat([T_LP, torch.tensor([[-0.1]], dtype=D)], -1)
    pad_s = torch.cat([S_LP, torch.tensor([[-7.0]], dtype=D)], -1)
    mask = torch.tensor([[True, True, False]])
    assert bucket_divergence(pad_t, pad_s, S_TAIL, mask, divergence, beta).item() == pytest.approx(out.item())


def test_teacher_tail_floor_and_full_support():
    # teacher puts all its mass on the support (tail 0 -> floored 1e-6); student matches it exactly
    t = torch.log(torch.tensor([[0.6, 0.4]], dtype=D))
    tail = torch.tensor([-60.0], dtype=D)  # below the student floor (-50): clamped, stays finite
    fkl = bucket_divergence(t, t, tail, ON, "forward_kl", teacher_tail_floor=1e-6)
    # only the tail bucket contributes: 1e-6 * (ln 1e-6 - (-50)) = 1e-6 * 36.18
    assert fkl.item() == pytest.approx(1e-6 * (math.log(1e-6) + 50), rel=1e-3)


def test_gradcheck_bucket_divergences():
    s = (S_LP + torch.tensor([[0.01, -0.02]], dtype=D)).requires_grad_(True)
    tail = S_TAIL.clone().requires_grad_(True)
    for divergence in ("forward_kl", "reverse_kl", "jsd", "tv"):
        assert torch.autograd.gradcheck(
            lambda a, b: bucket_divergence(T_LP, a, b, ON, divergence, 0.3).sum(), (s, tail)
        )


def test_reverse_kl_policy_gradient_by_hand():
    student = torch.tensor([[-1.0, -2.0]], dtype=D, requires_grad=True)
    teacher = torch.tensor([[-0.5, -3.0]], dtype=D)
    mask = torch.ones(1, 2, dtype=D)
    # r = T - S = [0.5, -1]; loss = -(0.5 * -1 + -1 * -2) / 2 = -0.75
    loss = reverse_kl_pg_loss(student, teacher, mask)
    assert loss.item() == pytest.approx(-0.75)
    loss.backward()
    # advantages are detached: d/dS = -r / 2 = [-0.25, 0.5]
    assert student.grad[0].tolist() == pytest.approx([-0.25, 0.5])
    # gamma = 1: returns [0.5 - 1, -1] = [-0.5, -1]; loss = -(-0.5 * -1 + -1 * -2) / 2 = -1.25
    assert reverse_kl_pg_loss(student, teacher, mask, gamma=1.0).item() == pytest.approx(-1.25)
    # gamma = 0.5: [0.5 + 0.5 * -1, -1] = [0, -1]
    assert discounted_returns(teacher - student.detach(), mask, 0.5).tolist() == [[0.0, -1.0]]


def test_reverse_kl_pg_gradient_is_the_exact_kl_gradient_in_expectation():
    # the loss is a surrogate (detached advantage), so gradcheck of its value does not apply; instead:
    # E_{y~q}[grad -(log p(y) - log q(y)) log q(y)] = grad KL(q || p), checked exactly on a 3-token vocabulary
    theta = torch.tensor([0.2, -0.5, 1.0], dtype=D, requires_grad=True)
    log_p = torch.log_softmax(torch.tensor([1.0, 0.0, -1.0], dtype=D), -1)
    log_q = torch.log_softmax(theta, -1)
    one = torch.ones(1, 1, dtype=D)
    surrogate = sum(
        log_q[y].exp().detach() * reverse_kl_pg_loss(log_q[y].view(1, 1), log_p[y].view(1, 1), one) for y in range(3)
    )
    (g_surrogate,) = torch.autograd.grad(surrogate, theta, retain_graph=True)
    (g_exact,) = torch.autograd.grad((log_q.exp() * (log_q - log_p)).sum(), theta)
    assert torch.allclose(g_surrogate, g_exact, atol=1e-12)


def test_teacher_logprobs_alignment(batch):
    # completions of group 0 have 3 and 2 tokens, starting at column prompt_len = 3
    fb = [TokenLogprobs(logprobs=[[-1.0, -2.0, -3.0], [-4.0]]), FeedbackFailure(reason="x")]
    tok = teacher_token_logprobs(batch, fb, "t")
    assert tok.teacher_BT[0, 3:6].tolist() == [-1.0, -2.0, -3.0] and tok.teacher_BT[1, 3].item() == -4.0
    assert tok.mask_BT[1].tolist() == [0, 0, 0, 1, 0, 0, 0]  # the teacher skipped the EOS of completion 1
    assert tok.missing == 1 and tok.mask_BT[2:].sum() == 0
    with pytest.raises(TokenizationMismatch, match="share a tokenizer"):
        teacher_token_logprobs(batch, [TokenLogprobs(logprobs=[[-1.0] * 4, [-1.0]])] * 2, "t")
    ragged = TokenLogprobs(logprobs=[[-1.0, -1.0, -1.0], [-1.0]], top_k=[[{2: -1.0}] * 3, []])
    with pytest.raises(ConfigError, match="one entry per scored token"):
        teacher_token_logprobs(batch, [ragged, FeedbackFailure(reason="x")], "t")
    with pytest.raises(ConfigError, match="token_logprobs"):
        teacher_token_logprobs(batch, [Score(scores=[1.0, 0.0])] * 2, "t")


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
    key = "reverse_kl" if divergence == "reverse_kl_pg" else divergence
    assert last[key] < first[key]
    assert last["feedback_failures"] == 1.0 and last["tokens"] == 5.0


def test_top_k_divergence_without_top_k_is_a_clear_error(model, batch):
    fb = [TokenLogprobs(logprobs=[[-1.0, -1.0, -1.0], [-1.0, -1.0]]), TokenLogprobs(logprobs=[[-1.0] * 4, [-1.0]])]
    with pytest.raises(ConfigError, match="top_k"):
        TokenDistill(divergence="jsd").loss(model, batch, fb)
    assert TokenDistill().loss(model, batch, fb).metrics["tokens"] == 10.0
