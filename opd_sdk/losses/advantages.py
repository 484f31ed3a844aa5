"""Advantages from per-completion rewards: REINFORCE, RLOO, GRPO.

All functions take rewards laid out per prompt group, rewards_PG[p, g], and
a validity mask valid_PG (False where the teacher failed or the reward is
not finite). Invalid entries get advantage 0 and never enter a baseline.

- REINFORCE with a baseline (Williams 1992): A = r - mean of all valid r in
  the batch.
- RLOO (Kool et al. 2019; Ahmadian et al. 2024): A_i = r_i - mean_{j != i}
  r_j over the valid members of i's group. A group with one valid member
  has no leave-one-out baseline: its advantage is 0 (no signal).
- GRPO (Shao et al. 2024, DeepSeekMath): A_i = (r_i - mean_group) /
  (std_group + eps), std the sample (n-1) standard deviation as in the
  reference implementations. Groups with fewer than two valid members, or
  with all rewards equal, get 0.
"""

from __future__ import annotations

from typing import Literal

import torch

from opd_sdk.errors import ConfigError

AdvantageKind = Literal["reinforce", "rloo", "grpo"]
ADVANTAGE_KINDS = ("reinforce", "rloo", "grpo")


def reinforce_advantages(rewards_PG: torch.Tensor, valid_PG: torch.Tensor) -> torch.Tensor:
    """[P, G] -> [P, G]: reward minus the batch mean over valid entries."""
    v = valid_PG.to(rewards_PG.dtype)
    n = v.sum()
    if n == 0:
        return torch.zeros_like(rewards_PG)
    r = torch.where(valid_PG, rewards_PG, torch.zeros_like(rewards_PG))
    baseline = r.sum() / n
    return (r - baseline) * v


def rloo_advantages(rewards_PG: torch.Tensor, valid_PG: torch.Tensor) -> torch.Tensor:
    """[P, G] -> [P, G]: reward minus the mean of the other valid rewards in its group."""
    v = valid_PG.to(rewards_PG.dtype)
    r = torch.where(valid_PG, rewards_PG, torch.zeros_like(rewards_PG))
    n_P1 = v.sum(-1, keepdim=True)
    others = (r.sum(-1, keepdim=True) - r) / (n_P1 - 1).clamp(min=1)
    has_baseline = (n_P1 >= 2).to(r.dtype)
    return (r - others) * v * has_baseline


def grpo_advantages(rewards_PG: torch.Tensor, valid_PG: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """[P, G] -> [P, G]: group-normalised reward (r - mean) / (std + eps)."""
    v = valid_PG.to(rewards_PG.dtype)
    r = torch.where(valid_PG, rewards_PG, torch.zeros_like(rewards_PG))
    n_P1 = v.sum(-1, keepdim=True)
    mean_P1 = r.sum(-1, keepdim=True) / n_P1.clamp(min=1)
    var_P1 = (((r - mean_P1) * v) ** 2).sum(-1, keepdim=True) / (n_P1 - 1).clamp(min=1)
    denom_P1 = var_P1.sqrt() + eps
    has_spread = (n_P1 >= 2) & (denom_P1 > 0)
    safe_P1 = torch.where(has_spread, denom_P1, torch.ones_like(denom_P1))
    return (r - mean_P1) / safe_P1 * v * has_spread.to(r.dtype)


def compute_advantages(
    kind: AdvantageKind, rewards_PG: torch.Tensor, valid_PG: torch.Tensor, eps: float = 1e-4
) -> torch.Tensor:
    if kind == "reinforce":
        return reinforce_advantages(rewards_PG, valid_PG)
    if kind == "rloo":
        return rloo_advantages(rewards_PG, valid_PG)
    if kind == "grpo":
        return grpo_advantages(rewards_PG, valid_PG, eps)
    raise ConfigError(f"advantage must be one of {ADVANTAGE_KINDS}, got {kind!r}")
