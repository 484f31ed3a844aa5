"""Negative log-likelihood (opd_sdk.losses.nll) against hand-worked numbers."""

import pytest
import torch

from opd_sdk.losses.nll import nll_loss, nll_sum


def test_nll_is_token_mean():
    # -( -1 - 2 ) / 2 masked tokens = 1.5
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    assert nll_loss(logp, torch.tensor([[1.0, 1.0, 0.0]])).item() == pytest.approx(1.5)
    # the sum form the objectives divide by the whole batch's token count: -(-1 - 2) = 3
    assert nll_sum(logp, torch.tensor([[1.0, 1.0, 0.0]])).item() == pytest.approx(3.0)
    assert nll_loss(logp, torch.zeros(1, 3)).item() == 0.0  # no token: 0, not a division by zero
