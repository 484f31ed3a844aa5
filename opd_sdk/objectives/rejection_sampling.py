"""`RejectionSampling`: fine-tune on the student's best samples per prompt.

Rejection-sampling fine-tuning / best-of-n distillation (as in RAFT, Dong et
al. 2023, and ReST's improve step, Gulcehre et al. 2023): score the G
samples, keep the top-k of each group and/or those at or above a threshold,
and minimise their NLL. It is the sequence-level objective E[R(y)] with R
an indicator of "kept" and no KL term: the simplest on-policy baseline.
Departure: one filtering round per batch (no growing dataset); the loss is
averaged over kept tokens.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from pydantic import Field, model_validator

from opd_sdk.constants import DEFAULT_CHUNK_ROWS
from opd_sdk.errors import ConfigError
from opd_sdk.losses.nll import nll_sum
from opd_sdk.objectives.base import MeanMetrics, PlanContext, run_loss
from opd_sdk.objectives.params import ObjectiveContext, ObjectiveParams
from opd_sdk.rollout.batch import RolloutBatch
from opd_sdk.tensors.forward import Part, Plan, View
from opd_sdk.tensors.targets import score_table
from opd_sdk.types import Feedback


def select_best(
    rewards_PG: torch.Tensor, valid_PG: torch.Tensor, top_k: int | None, threshold: float | None
) -> torch.Tensor:
    """Which samples to keep -> bool [P, G].

    Valid samples at or above `threshold` (when given); of those, at most
    `top_k` per group (when given), highest reward first, ties to the
    earlier sample.
    """
    if top_k is None and threshold is None:
        raise ConfigError("RejectionSampling needs top_k or threshold (or both)")
    keep_PG = valid_PG.clone()
    if threshold is not None:
        keep_PG &= rewards_PG >= threshold
    if top_k is not None:
        P, G = rewards_PG.shape
        masked = torch.where(keep_PG, rewards_PG, torch.full_like(rewards_PG, float("-inf")))
        order_PG = torch.sort(masked, dim=-1, descending=True, stable=True).indices
        rank_PG = torch.empty_like(order_PG)
        rank_PG.scatter_(-1, order_PG, torch.arange(G).expand(P, G).contiguous())
        keep_PG &= rank_PG < top_k
    return keep_PG


class RejectionSamplingParams(ObjectiveParams):
    """RejectionSampling's parameters (YAML `objective.params`); see the class docstring."""

    top_k: int | None = Field(1, ge=1)
    threshold: float | None = None
    chunk_rows: int = Field(DEFAULT_CHUNK_ROWS, gt=0)

    @model_validator(mode="after")
    def _keeps_something(self) -> "RejectionSamplingParams":
        if self.top_k is None and self.threshold is None:
            raise ValueError("RejectionSampling needs top_k or threshold (or both)")
        return self


class RejectionSampling:
    """NLL on the best completions per prompt (Score feedback).

    Keyword arguments are the fields of `RejectionSamplingParams` (defaults
    and bounds there; a bad value raises ConfigError):
    top_k: keep at most this many per group (default 1).
    threshold: keep only samples with reward >= threshold.
    chunk_rows: rows per LM-head chunk.
    """

    min_group_size = 1
    feedback_kinds = ("score",)
    copies_student = False
    recompute_head = False
    params_model = RejectionSamplingParams

    def __init__(self, **params: Any) -> None:
        p = RejectionSamplingParams.parse(params, "RejectionSampling")
        self.top_k = p.top_k
        self.threshold = p.threshold
        self.chunk_rows = p.chunk_rows

    @classmethod
    def from_params(cls, params: RejectionSamplingParams, ctx: ObjectiveContext) -> "RejectionSampling":
        return cls(**dict(params))

    def setup(self, policy: torch.nn.Module) -> None:
        pass

    def frozen_models(self) -> dict[str, torch.nn.Module]:
        return {}

    def after_step(self, step: int, policy: torch.nn.Module) -> None:
        pass

    def temperature(self, batch: RolloutBatch) -> float:
        return 1.0

    def loss(self, policy: torch.nn.Module, batch: RolloutBatch, feedback: Sequence[Feedback] | None):
        return run_loss(self, policy, batch, feedback)

    def state_dict(self) -> dict[str, Any]:
        return {}  # nothing kept between steps

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def plan(self, batch: RolloutBatch, feedback: Sequence[Feedback], ctx: PlanContext) -> Plan:
        table = score_table(batch, feedback, "RejectionSampling")
        keep_B = select_best(table.rewards_PG, table.valid_PG, self.top_k, self.threshold).reshape(-1)
        mask_BT = batch.completion_mask_BT.float() * keep_B.unsqueeze(-1).float().to(batch.completion_mask_BT.device)
        metrics = {"selected": float(keep_B.sum()), "tokens": float(mask_BT.sum())}
        if keep_B.any():
            metrics["selected_reward_mean"] = float(table.rewards_PG.reshape(-1)[keep_B].mean())
        return Plan(keep_B, float(mask_BT.sum()), int(keep_B.sum()), metrics, data={"mask_BT": mask_BT})

    def compute(self, view: View, plan: Plan, part: Part, batch: RolloutBatch) -> tuple[torch.Tensor, MeanMetrics]:
        logprobs_RT = view.policy()
        mask_RT = plan.data["mask_BT"][part.rows, : view.T].to(logprobs_RT.device)
        nll = nll_sum(logprobs_RT, mask_RT)
        return nll / plan.normaliser, {"nll": (nll.detach(), mask_RT.sum())}
