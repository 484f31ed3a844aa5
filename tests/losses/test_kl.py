"""KL estimators (opd_sdk.losses.kl) against hand-worked numbers."""

import math

import pytest
import torch

from opd_sdk.losses.kl import kl_per_token


def test_kl_estimators():
    # logp = -1, ref = -2: log_ratio = -1; k1 = 1; k3 = e^-1 - 1 + 1 = 0.367879
    logp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])
    assert kl_per_token(logp, ref, "k1").item() == pytest.approx(1.0)
    assert kl_per_token(logp, ref, "k3").item() == pytest.approx(math.exp(-1))
    assert kl_per_token(ref, ref, "k3").item() == 0.0
