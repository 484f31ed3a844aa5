"""`TokenDistill`: token-level on-policy distillation from `TokenLogprobs`.

The token-level objective of the unifying view,
    E_{y ~ student} [ sum_t D(p_T(.|x, y<t) || p_S(.|x, y<t)) ],
in two forms, picked by `divergence`:

- "reverse_kl_pg": only the teacher's log-prob of each sampled token is
  needed (any logprob endpoint). Reverse KL(S || T) as a per-token
  advantage, policy-gradient style as in MiniLLM (Gu et al. 2024) and
  on-policy distillation with a logprob teacher (Agarwal et al. 2024;
  Thinking Machines 2025): r_t = log p_T(y_t) - log p_S(y_t) (detached),
  A_t = sum_{t' >= t} gamma^(t'-t) r_t', loss = -sum_t A_t log p_S(y_t) / n.
  gamma = 0 (the default) is the per-token form; gamma = 1 is MiniLLM's
  full return (without its length normalisation, clipping or PT loss).
- "forward_kl", "reverse_kl", "jsd", "tv": analytic divergences at every
  sampled position over the teacher's top-k support (plus the sampled
  token, whose teacher log-prob is always known), as in GKD (Agarwal et al.
  2024) with on-policy samples. The tail is explicit: each distribution gets
  an "other" bucket holding its mass outside the support, so both sum to 1
  over K+1 buckets. The student's tail is computed exactly from its logits;
  the teacher's is 1 - sum(top-k), floored at `teacher_tail_floor` (API
  log-probs are rounded; a zero tail would make reverse KL infinite). As in
  GKD, the gradient does not flow through the choice of y (no
  policy-gradient term for the future positions).
  jsd(beta) = beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q,
  with P the teacher and Q the student (GKD's definition); tv = 1/2 sum |P - Q|.
Losses are averaged over the scored completion tokens of the batch.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch

from opd_sdk.batch import RolloutBatch
from opd_sdk.errors import ConfigError
from opd_sdk.logprobs import selected_logprobs
from opd_sdk.objectives.base import LossOutput, count_failures, first_param_zero, zero_loss
from opd_sdk.objectives.reward_weighted import masked_normalise
from opd_sdk.objectives.teacher_tokens import support_logprobs, teacher_support, teacher_token_logprobs
from opd_sdk.types import Feedback

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


def reverse_kl_pg_loss(
    student_BT: torch.Tensor, teacher_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float = 0.0
) -> torch.Tensor:
    """Policy-gradient reverse KL: -sum_t A_t * log p_S(y_t) / n with A from detached r_t = T - S -> []."""
    advantage_BT = discounted_returns((teacher_BT - student_BT).detach(), mask_BT, gamma)
    return masked_normalise(-advantage_BT * student_BT, mask_BT, "token")


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
    student_log_tail_M: log of the student's mass outside the support.
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


class TokenDistill:
    """Token-level distillation on TokenLogprobs feedback; see the module docstring.

    divergence: "reverse_kl_pg" (sampled-token log-probs suffice) or
        "forward_kl" | "reverse_kl" | "jsd" | "tv" (need TokenLogprobs.top_k
        from a teacher sharing the student's tokenizer).
    gamma: discount of the reverse-KL returns (reverse_kl_pg only).
    beta: the JSD mixture weight (jsd only).
    """

    feedback_kinds = ("token_logprobs",)

    def __init__(
        self,
        *,
        divergence: Literal["reverse_kl_pg", "forward_kl", "reverse_kl", "jsd", "tv"] = "reverse_kl_pg",
        gamma: float = 0.0,
        beta: float = 0.5,
        teacher_tail_floor: float = 1e-6,
        chunk_rows: int = 4,
    ) -> None:
        if divergence not in DIVERGENCES:
            raise ConfigError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
        if not 0.0 <= gamma <= 1.0:
            raise ConfigError(f"gamma must be in [0, 1], got {gamma}")
        if divergence == "jsd" and not 0.0 < beta < 1.0:
            raise ConfigError(f"jsd beta must be in (0, 1) (0.5 is the symmetric JSD), got {beta}")
        self.divergence = divergence
        self.gamma = gamma
        self.beta = beta
        self.teacher_tail_floor = teacher_tail_floor
        self.chunk_rows = chunk_rows

    def setup(self, policy: torch.nn.Module) -> None:
        pass

    def after_step(self, step: int, policy: torch.nn.Module) -> None:
        pass

    def loss(self, policy: torch.nn.Module, batch: RolloutBatch, feedback: Sequence[Feedback]) -> LossOutput:
        tokens = teacher_token_logprobs(batch, feedback, "TokenDistill")
        metrics = {
            "feedback_failures": float(count_failures(feedback)),
            "tokens": float(tokens.mask_BT.sum()),
            "teacher_tokens_missing": float(tokens.missing),
            "teacher_nonfinite": float(tokens.nonfinite),
        }
        if self.divergence == "reverse_kl_pg":
            student_BT = selected_logprobs(
                policy,
                batch.input_ids_BT,
                batch.attention_mask_BT,
                chunk_rows=self.chunk_rows,
                from_col=batch.prompt_len,
            )
            if tokens.mask_BT.sum() == 0:
                return LossOutput(zero_loss(student_BT), {**metrics, "loss": 0.0})
            loss = reverse_kl_pg_loss(student_BT, tokens.teacher_BT, tokens.mask_BT, self.gamma)
            # k1 estimate of KL(S || T) per token: mean of log p_S(y) - log p_T(y)
            log_ratio_BT = (student_BT - tokens.teacher_BT).detach()
            metrics["reverse_kl"] = float(masked_normalise(log_ratio_BT, tokens.mask_BT, "token"))
            metrics["loss"] = float(loss.detach())
            return LossOutput(loss, metrics)

        vocab = getattr(getattr(policy, "config", None), "vocab_size", None) or 1 << 62
        support = teacher_support(batch, feedback, tokens, vocab, "TokenDistill")
        if support.rows_M.numel() == 0:
            return LossOutput(first_param_zero(policy), {**metrics, "loss": 0.0})
        student_MK, log_tail_M = support_logprobs(
            policy, batch.input_ids_BT, batch.attention_mask_BT, support, chunk_positions=64 * self.chunk_rows
        )
        per_position_M = bucket_divergence(
            support.teacher_MK, student_MK, log_tail_M, support.mask_MK,
            self.divergence, self.beta, self.teacher_tail_floor,
        )
        loss = per_position_M.mean()
        with torch.no_grad():
            t_tail = (1.0 - torch.where(support.mask_MK, support.teacher_MK.exp(), 0.0).sum(-1)).clamp(min=0)
        metrics.update(
            {
                self.divergence: float(loss.detach()),
                "support_size_mean": float(support.mask_MK.sum(-1).float().mean()),
                "teacher_tail_mean": float(t_tail.mean()),
                "student_tail_mean": float(log_tail_M.detach().exp().mean()),
                "loss": float(loss.detach()),
            }
        )
        return LossOutput(loss, metrics)
