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
Losses are averaged over the scored completion tokens (or support positions) of
the batch; the math lives in `opd_sdk.losses.token_divergence`.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from pydantic import Field, model_validator

from opd_sdk.constants import DEFAULT_CHUNK_ROWS
from opd_sdk.losses.token_divergence import (
    bucket_divergence,
    reverse_kl_pg_per_token,
)
from opd_sdk.objectives.base import MeanMetrics, PlanContext, run_loss
from opd_sdk.objectives.params import ObjectiveContext, ObjectiveParams
from opd_sdk.rollout.batch import RolloutBatch
from opd_sdk.tensors.forward import Part, Plan, View
from opd_sdk.tensors.targets import teacher_support, teacher_token_logprobs
from opd_sdk.types import Feedback

__all__ = ["TokenDistill", "TokenDistillParams"]


class TokenDistillParams(ObjectiveParams):
    """TokenDistill's parameters (YAML `objective.params`); see the class docstring."""

    divergence: Literal["reverse_kl_pg", "forward_kl", "reverse_kl", "jsd", "tv"] = "reverse_kl_pg"
    gamma: float = Field(0.0, ge=0.0, le=1.0)
    beta: float = 0.5
    teacher_tail_floor: float = 1e-6
    chunk_rows: int = Field(DEFAULT_CHUNK_ROWS, gt=0)

    @model_validator(mode="after")
    def _jsd_beta(self) -> "TokenDistillParams":
        if self.divergence == "jsd" and not 0.0 < self.beta < 1.0:
            raise ValueError(f"jsd beta must be in (0, 1) (0.5 is the symmetric JSD), got {self.beta}")
        return self


class TokenDistill:
    """Token-level distillation on TokenLogprobs feedback; see the module docstring.

    Keyword arguments are the fields of `TokenDistillParams` (defaults and
    bounds there; a bad value raises ConfigError):
    divergence: "reverse_kl_pg" (sampled-token log-probs suffice) or
        "forward_kl" | "reverse_kl" | "jsd" | "tv" (need TokenLogprobs.top_k
        from a teacher sharing the student's tokenizer).
    gamma: discount of the reverse-KL returns (reverse_kl_pg only).
    beta: the JSD mixture weight (jsd only).
    teacher_tail_floor: floor of the teacher's mass outside its top-k.
    chunk_rows: rows per LM-head chunk.
    """

    min_group_size = 1
    feedback_kinds = ("token_logprobs",)
    copies_student = False
    recompute_head = False
    params_model = TokenDistillParams

    def __init__(self, **params: Any) -> None:
        p = TokenDistillParams.parse(params, "TokenDistill")
        self.divergence = p.divergence
        self.gamma = p.gamma
        self.beta = p.beta
        self.teacher_tail_floor = p.teacher_tail_floor
        self.chunk_rows = p.chunk_rows

    @classmethod
    def from_params(cls, params: TokenDistillParams, ctx: ObjectiveContext) -> "TokenDistill":
        return cls(**dict(params))

    def setup(self, policy: torch.nn.Module) -> None:
        pass

    def after_step(self, step: int, policy: torch.nn.Module) -> None:
        pass

    def temperature(self, batch: RolloutBatch) -> float:
        return 1.0  # the student's own distribution, compared with the teacher's

    def frozen_models(self) -> dict[str, torch.nn.Module]:
        return {}

    def loss(self, policy: torch.nn.Module, batch: RolloutBatch, feedback: Sequence[Feedback]):
        return run_loss(self, policy, batch, feedback)

    def state_dict(self) -> dict[str, Any]:
        return {}  # nothing kept between steps

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def plan(self, batch: RolloutBatch, feedback: Sequence[Feedback], ctx: PlanContext) -> Plan:
        tokens = teacher_token_logprobs(batch, feedback, "TokenDistill")
        metrics = {
            "tokens": float(tokens.mask_BT.sum()),
            "teacher_tokens_missing": float(tokens.missing),
            "teacher_nonfinite": float(tokens.nonfinite),
        }
        rows_B = (tokens.mask_BT.sum(-1) > 0).cpu()
        data = {"teacher_BT": tokens.teacher_BT, "mask_BT": tokens.mask_BT}
        if self.divergence == "reverse_kl_pg":
            n = int(tokens.mask_BT.sum())
            return Plan(rows_B, float(n), n, metrics, data=data)
        support = teacher_support(batch, feedback, tokens, ctx.vocab_size, "TokenDistill")
        M = int(support.rows_M.numel())
        return Plan(rows_B, float(M), M, metrics, support=support, data=data)

    def compute(self, view: View, plan: Plan, part: Part, batch: RolloutBatch) -> tuple[torch.Tensor, MeanMetrics]:
        if self.divergence == "reverse_kl_pg":
            rows, T = part.rows, view.T
            student_RT = view.policy(1.0)
            teacher_RT = plan.data["teacher_BT"][rows, :T].to(student_RT.device)
            mask_RT = plan.data["mask_BT"][rows, :T].to(student_RT.device)
            per_token_RT = reverse_kl_pg_per_token(student_RT, teacher_RT, mask_RT, self.gamma)
            if view.weights is not None:
                per_token_RT = per_token_RT * view.weights
            # k1 estimate of KL(S || T) per token: mean of log p_S(y) - log p_T(y)
            log_ratio = ((student_RT - teacher_RT).detach() * mask_RT).sum()
            return per_token_RT.sum() / plan.normaliser, {"reverse_kl": (log_ratio, mask_RT.sum())}
        assert plan.support is not None
        student_MK, log_tail_M = view.support()
        sel = part.support_M.to(plan.support.teacher_MK.device)
        teacher_MK, mask_MK = plan.support.teacher_MK[sel], plan.support.mask_MK[sel]
        per_position_M = bucket_divergence(
            teacher_MK, student_MK, log_tail_M, mask_MK, self.divergence, self.beta, self.teacher_tail_floor
        )
        M = per_position_M.shape[0]
        with torch.no_grad():
            teacher_tail_M = (1.0 - torch.where(mask_MK, teacher_MK.exp(), 0.0).sum(-1)).clamp(min=0)
        means: MeanMetrics = {
            self.divergence: (per_position_M.detach().sum(), M),
            "support_size_mean": (mask_MK.sum(), M),
            "teacher_tail_mean": (teacher_tail_M.sum(), M),
            "student_tail_mean": (log_tail_M.detach().exp().sum(), M),
        }
        return per_position_M.sum() / plan.normaliser, means
