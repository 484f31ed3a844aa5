"""Advantages against hand-worked numbers."""

import math

import pytest
import torch

from opd_sdk.errors import ConfigError
from opd_sdk.losses.advantages import (
    compute_advantages,
    grpo_advantages,
    reinforce_advantages,
    rloo_advantages,
)

R = torch.tensor([[1.0, 0.0, 2.0], [3.0, 3.0, 0.0]], dtype=torch.float64)
ALL = torch.ones(2, 3, dtype=torch.bool)
SOME = torch.tensor([[True, True, False], [True, False, False]])


def test_reinforce_batch_mean_baseline():
    # mean of all six = 9/6 = 1.5
    expected = torch.tensor([[-0.5, -1.5, 0.5], [1.5, 1.5, -1.5]], dtype=torch.float64)
    assert torch.allclose(reinforce_advantages(R, ALL), expected)
    # valid rewards 1, 0, 3 -> mean 4/3; invalid entries get 0
    expected = torch.tensor([[-1 / 3, -4 / 3, 0.0], [5 / 3, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(reinforce_advantages(R, SOME), expected)


def test_rloo_leave_one_out():
    # group 0: 1 - (0+2)/2 = 0, 0 - (1+2)/2 = -1.5, 2 - (1+0)/2 = 1.5
    # group 1: 3 - (3+0)/2 = 1.5 (twice), 0 - (3+3)/2 = -3
    expected = torch.tensor([[0.0, -1.5, 1.5], [1.5, 1.5, -3.0]], dtype=torch.float64)
    assert torch.allclose(rloo_advantages(R, ALL), expected)
    # group 0 valid {1, 0}: 1 - 0 = 1, 0 - 1 = -1; group 1 has one valid member: no baseline -> 0
    expected = torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(rloo_advantages(R, SOME), expected)


def test_grpo_group_normalised():
    # group 0: mean 1, sample var (0 + 1 + 1)/2 = 1 -> [0, -1, 1]
    # group 1: mean 2, deviations [1, 1, -2], var (1 + 1 + 4)/2 = 3 -> [1, 1, -2]/sqrt(3)
    s3 = math.sqrt(3)
    expected = torch.tensor([[0.0, -1.0, 1.0], [1 / s3, 1 / s3, -2 / s3]], dtype=torch.float64)
    assert torch.allclose(grpo_advantages(R, ALL, eps=0.0), expected)
    # group 0 valid {1, 0}: mean .5, var (.25 + .25)/1 = .5, std .70711 -> +-0.70711; group 1 -> 0
    a = 0.5 / math.sqrt(0.5)
    expected = torch.tensor([[a, -a, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(grpo_advantages(R, SOME, eps=0.0), expected)


def test_grpo_equal_rewards_give_zero_not_nan():
    out = grpo_advantages(torch.ones(1, 4, dtype=torch.float64), torch.ones(1, 4, dtype=torch.bool))
    assert torch.equal(out, torch.zeros(1, 4, dtype=torch.float64))


def test_unknown_kind_is_a_clear_error():
    with pytest.raises(ConfigError, match="rloo"):
        compute_advantages("ppo", R, ALL)
