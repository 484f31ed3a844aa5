"""Token divergences (opd_sdk.losses.token_divergence): f-divergences over a top-k support and the
reverse-KL policy gradient against hand-worked numbers, gradcheck."""

import math

import pytest
import torch

from opd_sdk.losses.token_divergence import (
    bucket_divergence,
    discounted_returns,
    reverse_kl_pg_loss,
)

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
