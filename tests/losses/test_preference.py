"""DPO / IPO and SPIN losses (opd_sdk.losses.preference) against hand-worked numbers, and gradcheck."""

import math

import pytest
import torch

from opd_sdk.losses.preference import dpo_loss, spin_loss

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
