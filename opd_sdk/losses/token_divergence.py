"""Token-level divergences between a teacher P and the student Q on the student's samples.

- Reverse KL as a per-token advantage, policy-gradient style (MiniLLM, Gu et
  al. 2024; on-policy distillation with a logprob teacher, Agarwal et al.
  2024; Thinking Machines 2025): r_t = log p_T(y_t) - log p_S(y_t)
  (detached), A_t = sum_{t' >= t} gamma^(t'-t) r_t', loss_t = -A_t log p_S(y_t).
- Analytic divergences over the teacher's top-k support plus one "other"
  bucket holding each distribution's mass outside it (GKD, Agarwal et al.
  2024, with the tail made explicit): forward KL(P || Q), reverse KL(Q || P),
  generalised JSD(beta) = beta KL(P || M) + (1 - beta) KL(Q || M) with
  M = beta P + (1 - beta) Q, and TV = 1/2 sum |P - Q|.
"""

from __future__ import annotations

import math

import torch

from opd_sdk.errors import ConfigError

DIVERGENCES = ("reverse_kl_pg", "forward_kl", "reverse_kl", "jsd", "tv")
STUDENT_LOG_TAIL_FLOOR = -50.0  # ~2e-22: keeps log(student tail) finite when the support covers everything


def discounted_returns(rewards_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float) -> torch.Tensor:
    """A_t = sum_{t' >= t, masked} gamma^(t'-t) r_t' along each row -> [B, T] (0 off-mask)."""
    r_BT = rewards_BT * mask_BT
    if gamma == 0.0:
        return r_BT
    out_BT = torch.zeros_like(r_BT)
    running_B = torch.zeros_like(r_BT[:, 0])
    for t in range(r_BT.shape[1] - 1, -1, -1):
        running_B = r_BT[:, t] + gamma * running_B
        out_BT[:, t] = running_B
    return out_BT * mask_BT


def reverse_kl_pg_per_token(
    student_BT: torch.Tensor, teacher_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float = 0.0
) -> torch.Tensor:
    """-A_t * log p_S(y_t) with A from the detached r_t = teacher - student -> [B, T] (0 off-mask)."""
    advantage_BT = discounted_returns((teacher_BT - student_BT).detach(), mask_BT, gamma)
    return torch.where(mask_BT > 0, -advantage_BT * student_BT, torch.zeros_like(student_BT)) * mask_BT


def reverse_kl_pg_loss(
    student_BT: torch.Tensor, teacher_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float = 0.0
) -> torch.Tensor:
    """Token mean of `reverse_kl_pg_per_token` over this tensor's own mask -> []."""
    return reverse_kl_pg_per_token(student_BT, teacher_BT, mask_BT, gamma).sum() / mask_BT.sum().clamp(min=1.0)


def bucket_divergence(
    teacher_MK: torch.Tensor,
    student_MK: torch.Tensor,
    student_log_tail_M: torch.Tensor,
    mask_MK: torch.Tensor,
    divergence: str,
    beta: float = 0.5,
    teacher_tail_floor: float = 1e-6,
) -> torch.Tensor:
    """Divergence between teacher P and student Q on K support buckets + 1 tail bucket -> [M].

    teacher_MK, student_MK: log-probs on the support (padding where mask_MK is False).
    student_log_tail_M: log of the student's mass outside the support. The
    teacher's tail is 1 - sum(top-k), floored at `teacher_tail_floor` (API
    log-probs are rounded; a zero tail would make reverse KL infinite).
    """
    neg = torch.full_like(student_MK, -math.inf)
    t_MK = torch.where(mask_MK, teacher_MK, neg)
    s_MK = torch.where(mask_MK, student_MK, neg)
    t_tail_M = (1.0 - torch.exp(t_MK).sum(-1)).clamp(min=teacher_tail_floor)
    logP = torch.cat([t_MK, torch.log(t_tail_M).unsqueeze(-1)], -1)  # [M, K+1]
    logQ = torch.cat([s_MK, student_log_tail_M.clamp(min=STUDENT_LOG_TAIL_FLOOR).unsqueeze(-1)], -1)
    on = torch.cat([mask_MK, torch.ones_like(mask_MK[:, :1])], -1)
    zero = torch.zeros_like(logP)
    logP, logQ = torch.where(on, logP, zero), torch.where(on, logQ, zero)  # finite everywhere
    P, Q = torch.exp(logP) * on, torch.exp(logQ) * on

    def kl(a, log_a, log_b):
        return torch.where(on, a * (log_a - log_b), zero).sum(-1)

    if divergence == "forward_kl":
        return kl(P, logP, logQ)
    if divergence == "reverse_kl":
        return kl(Q, logQ, logP)
    if divergence == "jsd":
        if not 0.0 < beta < 1.0:
            raise ConfigError(f"jsd beta must be in (0, 1) (0.5 is the symmetric JSD), got {beta}")
        logM = torch.logsumexp(torch.stack([logP + math.log(beta), logQ + math.log(1.0 - beta)]), 0)
        return beta * kl(P, logP, logM) + (1.0 - beta) * kl(Q, logQ, logM)
    if divergence == "tv":
        return 0.5 * (P - Q).abs().sum(-1)
    raise ConfigError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
