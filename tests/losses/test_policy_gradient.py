"""Policy-gradient losses (opd_sdk.losses.policy_gradient) against hand-worked numbers, and gradcheck."""

import pytest
import torch

from opd_sdk.losses.kl import kl_per_token
from opd_sdk.losses.policy_gradient import masked_normalise, policy_gradient_loss

LOGP = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -4.0]], dtype=torch.float64)
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
ADV = torch.tensor([2.0, -1.0], dtype=torch.float64)


def test_pg_loss_token_and_sequence_normalisation():
    logp = LOGP.clone().requires_grad_(True)
    loss, _ = policy_gradient_loss(logp, ADV, MASK, normalisation="token")
    # ratio = 1 everywhere: -(2 + 2 - 1) / 3 tokens = -1
    assert loss.item() == pytest.approx(-1.0)
    loss.backward()
    # d loss / d logp_t = -A_row / 3 on masked tokens, 0 elsewhere
    expected = torch.tensor([[-2 / 3, -2 / 3, 0.0], [1 / 3, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(logp.grad, expected)
    loss, _ = policy_gradient_loss(LOGP, ADV, MASK, normalisation="sequence")
    # row 0: -(2 + 2)/2 = -2; row 1: -(-1)/1 = 1; mean over rows = -0.5
    assert loss.item() == pytest.approx(-0.5)


def test_pg_loss_clipping():
    old = torch.tensor([[-1.5, -2.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    logp = LOGP.clone().requires_grad_(True)
    loss, clip_fraction = policy_gradient_loss(logp, ADV, MASK, old_logprobs_BT=old, clip_eps=0.2)
    # row 0 t0: ratio e^0.5 = 1.6487, A=2: min(3.297, 1.2*2=2.4) = 2.4 (clipped)
    # row 0 t1: ratio 1 -> 2
    # row 1 t0: ratio e^-0.3 = 0.7408, A=-1: min(-0.7408, -0.8) = -0.8 (clipped)
    # loss = -(2.4 + 2 - 0.8)/3 = -1.2; 2 of 3 tokens clipped
    assert loss.item() == pytest.approx(-1.2)
    assert clip_fraction.item() == pytest.approx(2 / 3)
    loss.backward()
    # clipped tokens carry no gradient; row 0 t1: -A * ratio / 3 = -2/3
    expected = torch.tensor([[0.0, -2 / 3, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(logp.grad, expected)


def test_masked_normalise_empty_mask_is_zero():
    assert masked_normalise(LOGP, torch.zeros_like(MASK), "token").item() == 0.0
    assert masked_normalise(LOGP, torch.zeros_like(MASK), "sequence").item() == 0.0


def test_gradcheck_clipped_loss_and_k3():
    old = torch.tensor([[-1.5, -2.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    logp = (LOGP + 0.01).requires_grad_(True)  # away from the clip kinks
    ref = torch.tensor([[-0.7, -2.5, -1.0], [-0.2, -1.0, -3.0]], dtype=torch.float64)

    def f(lp):
        pg, _ = policy_gradient_loss(lp, ADV, MASK, old_logprobs_BT=old, clip_eps=0.2, normalisation="sequence")
        return pg + 0.1 * masked_normalise(kl_per_token(lp, ref, "k3"), MASK, "token")

    assert torch.autograd.gradcheck(f, (logp,))
