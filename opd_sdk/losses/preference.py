"""Pairwise losses on sequence log-probs: DPO / IPO (online DPO) and SPIN.

DPO (Rafailov et al. 2023), online as in Guo et al. 2024: with
h = (log p(y_w) - log p_ref(y_w)) - (log p(y_l) - log p_ref(y_l)) and the
teacher's probability p that y_w beats y_l,
    sigmoid: -[p log sigmoid(beta h) + (1 - p) log sigmoid(-beta h)]
    ipo:     (h - (p - 1/2) / beta)^2   (Azar et al. 2024; summed, not length-averaged, log-probs)
SPIN (Chen et al. 2024): with the opponent in place of the reference and the
real text as the winner, margin = (log p(y) - log p(y')) - (log p_opp(y) - log p_opp(y')),
    sigmoid: -log sigmoid(beta margin);  hinge: max(0, 1 - beta margin).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from opd_sdk.errors import ConfigError


def dpo_per_pair(
    policy_w_N: torch.Tensor,
    policy_l_N: torch.Tensor,
    ref_w_N: torch.Tensor,
    ref_l_N: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    prob_N: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO / IPO per pair from sequence log-probs [N] -> (loss_N, h_N detached)."""
    h_N = (policy_w_N - ref_w_N) - (policy_l_N - ref_l_N)
    p_N = torch.ones_like(h_N) if prob_N is None else prob_N.to(h_N.dtype)
    if loss_type == "sigmoid":
        per_pair_N = -(p_N * F.logsigmoid(beta * h_N) + (1.0 - p_N) * F.logsigmoid(-beta * h_N))
    elif loss_type == "ipo":
        per_pair_N = (h_N - (p_N - 0.5) / beta) ** 2
    else:
        raise ConfigError(f"OnlineDPO loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")
    return per_pair_N, h_N.detach()


def dpo_loss(policy_w_N, policy_l_N, ref_w_N, ref_l_N, beta, loss_type="sigmoid", prob_N=None):
    """Mean of `dpo_per_pair` over N pairs -> (loss [], h_N)."""
    per_pair_N, h_N = dpo_per_pair(policy_w_N, policy_l_N, ref_w_N, ref_l_N, beta, loss_type, prob_N)
    return per_pair_N.mean(), h_N


def spin_per_pair(
    policy_real_N: torch.Tensor,
    policy_gen_N: torch.Tensor,
    opp_real_N: torch.Tensor,
    opp_gen_N: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor]:
    """SPIN per (real, generated) pair from sequence log-probs [N] -> (loss_N, margin_N detached)."""
    margin_N = (policy_real_N - policy_gen_N) - (opp_real_N - opp_gen_N)
    logits_N = beta * margin_N
    if loss_type == "sigmoid":
        per_pair_N = -F.logsigmoid(logits_N)
    elif loss_type == "hinge":
        per_pair_N = torch.relu(1.0 - logits_N)
    else:
        raise ConfigError(f"SPIN loss_type must be 'sigmoid' or 'hinge', got {loss_type!r}")
    return per_pair_N, margin_N.detach()


def spin_loss(policy_real_N, policy_gen_N, opp_real_N, opp_gen_N, beta, loss_type="sigmoid"):
    """Mean of `spin_per_pair` over N pairs -> (loss [], margin_N)."""
    per_pair_N, margin_N = spin_per_pair(policy_real_N, policy_gen_N, opp_real_N, opp_gen_N, beta, loss_type)
    return per_pair_N.mean(), margin_N
