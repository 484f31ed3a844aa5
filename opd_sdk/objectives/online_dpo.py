"""`OnlineDPO`: preference optimisation on pairs of the student's own samples.

Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online
AI Feedback"): DPO's loss (Rafailov et al. 2023) on pairs sampled from the
current student and labelled by a teacher. With h = (log p(y_w) - log
p_ref(y_w)) - (log p(y_l) - log p_ref(y_l)) (sequence log-probs, sums over
completion tokens, EOS included) and the teacher's probability p that y_w
beats y_l:

    sigmoid: -[p log sigmoid(beta h) + (1 - p) log sigmoid(-beta h)]
             (p = 1: plain DPO; p < 1: the "conservative" label-smoothed form)
    ipo:     (h - (p - 1/2) / beta)^2  (Azar et al. 2024; p = 1 gives the
             paper's target 1 / (2 beta))

Pairs come from `Preference` feedback (every pair the teacher gave) or from
`Score` feedback (the best against the worst sample of each group, first
index on ties; a group whose scores are all equal gives no pair). The
reference model is a frozen copy of the student made in `setup`.
Departure: IPO here uses summed, not length-averaged, log-probs.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from pydantic import Field

from opd_sdk.constants import DEFAULT_CHUNK_ROWS
from opd_sdk.errors import ConfigError
from opd_sdk.losses.preference import dpo_per_pair
from opd_sdk.objectives.base import MeanMetrics, PlanContext, frozen_copy, run_loss
from opd_sdk.objectives.params import ObjectiveContext, ObjectiveParams
from opd_sdk.rollout.batch import RolloutBatch
from opd_sdk.tensors.forward import Part, Plan, View
from opd_sdk.tensors.targets import feedback_pairs
from opd_sdk.types import Feedback

__all__ = ["OnlineDPO", "OnlineDPOParams"]


class OnlineDPOParams(ObjectiveParams):
    """OnlineDPO's parameters (YAML `objective.params`); see the class docstring."""

    beta: float = Field(0.1, gt=0.0)
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    chunk_rows: int = Field(DEFAULT_CHUNK_ROWS, gt=0)


class OnlineDPO:
    """DPO / IPO on teacher-labelled pairs of student samples; see the module docstring.

    Keyword arguments are the fields of `OnlineDPOParams` (defaults and
    bounds there; a bad value raises ConfigError), plus `reference`:
    beta: DPO temperature. loss_type: "sigmoid" | "ipo". chunk_rows: rows per LM-head chunk.
    reference: frozen reference model (default: a frozen copy made in setup()).
    """

    min_group_size = 2  # pairs compare two samples of one prompt
    feedback_kinds = ("preference", "score")
    copies_student = True  # the reference
    recompute_head = False
    params_model = OnlineDPOParams

    def __init__(self, *, reference: torch.nn.Module | None = None, **params: Any) -> None:
        p = OnlineDPOParams.parse(params, "OnlineDPO")
        self.beta = p.beta
        self.loss_type = p.loss_type
        self.reference = reference
        self.chunk_rows = p.chunk_rows

    @classmethod
    def from_params(cls, params: OnlineDPOParams, ctx: ObjectiveContext) -> "OnlineDPO":
        return cls(**dict(params))

    def setup(self, policy: torch.nn.Module) -> None:
        if self.reference is None:
            self.reference = frozen_copy(policy)

    def frozen_models(self) -> dict[str, torch.nn.Module]:
        if self.reference is None:
            raise ConfigError("OnlineDPO needs setup(policy) before the first loss (it copies the reference)")
        return {"reference": self.reference}

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
        pairs = feedback_pairs(batch, feedback, "OnlineDPO")
        rows_B = torch.zeros(batch.size, dtype=torch.bool)
        for w, l_, _ in pairs:
            rows_B[w] = rows_B[l_] = True  # only rows in a pair are run
        return Plan(rows_B, float(len(pairs)), len(pairs), {"pairs": float(len(pairs))}, data={"pairs": pairs})

    def compute(self, view: View, plan: Plan, part: Part, batch: RolloutBatch) -> tuple[torch.Tensor, MeanMetrics]:
        rows, T = part.rows.tolist(), view.T
        slot = {r: i for i, r in enumerate(rows)}
        pairs = [(w, l_, p) for w, l_, p in plan.data["pairs"] if w in slot]
        mask_RT = batch.completion_mask_BT[rows, :T].float()
        policy_R = (view.policy() * mask_RT).sum(-1)
        ref_R = (view.policy(model="reference") * mask_RT).sum(-1)
        w = torch.tensor([slot[w] for w, _, _ in pairs], device=policy_R.device)
        l_ = torch.tensor([slot[l] for _, l, _ in pairs], device=policy_R.device)
        prob_N = torch.tensor([p for _, _, p in pairs], dtype=policy_R.dtype, device=policy_R.device)
        per_pair_N, h_N = dpo_per_pair(policy_R[w], policy_R[l_], ref_R[w], ref_R[l_], self.beta, self.loss_type, prob_N)
        n = len(pairs)
        return per_pair_N.sum() / plan.normaliser, {"margin_mean": (h_N.sum(), n), "margin_accuracy": ((h_N > 0).sum(), n)}
