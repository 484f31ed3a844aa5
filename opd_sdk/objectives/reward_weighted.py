"""`RewardWeighted`: policy gradient on `Score` feedback (REINFORCE / RLOO / GRPO).

Sequence-level view: maximise E_{y~student}[R(y)] - beta KL(student || reference)
with the score-function gradient, E[A(y) * grad sum_t log p_S(y_t)], where A
is the reward minus a baseline (see `advantages.py`).

Follows GRPO (Shao et al. 2024) and RLOO (Ahmadian et al. 2024) with these
choices made explicit:
- `normalisation="token"` divides the summed per-token loss by the number of
  valid tokens in the batch (DAPO, Yu et al. 2025: long answers are not
  down-weighted); `"sequence"` averages each sequence over its own tokens,
  then over sequences (the GRPO paper).
- `clip_eps`: PPO-style ratio clipping (Schulman et al. 2017) against
  `batch.sampler_logprobs_BT`. The policy's log-probs are taken at `batch.temperature` (logits /
  temperature, as the sampler's were, and as TRL's GRPO does), so the ratio
  compares like with like. Without clipping the ratio is taken against the detached current
  log-probs: value 1, gradient exactly REINFORCE's.
- KL to a frozen reference, per token, with log_ratio = log p_ref - log p_S
  (Schulman's estimators): k1 = -log_ratio, k3 = exp(log_ratio) - 1 - log_ratio.
  `kl_penalty="loss"` adds beta * kl to the loss (GRPO's choice, with k3);
  `"reward"` subtracts beta * sum_t kl_t (detached) from each reward before
  the advantages (PPO-RLHF / RLOO's choice, usually with k1). Note that k1
  placed in the loss has zero expected gradient on-policy; use it in the
  reward. With the penalty in the reward, advantages are computed per
  micro-batch (the KL needs its forward pass): exact for the group-relative
  RLOO and GRPO, while REINFORCE's batch-mean baseline becomes the
  micro-batch's mean when the trainer accumulates gradients.
- A flat group (every valid reward within the trainer's tolerance) has
  advantage exactly 0 and no row of it is run (beta = 0); a batch with no
  non-flat valid group has no signal, and the trainer takes no step.
- With samples from another engine, policy-gradient terms carry the
  truncated importance weights of `losses.policy_gradient` (the View's).

The math lives in `opd_sdk.losses` (advantages, policy_gradient, kl).
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from pydantic import Field

from opd_sdk.errors import ConfigError
from opd_sdk.constants import DEFAULT_CHUNK_ROWS
from opd_sdk.losses.advantages import AdvantageKind, compute_advantages
from opd_sdk.losses.kl import kl_per_token
from opd_sdk.losses.policy_gradient import (
    mask_units,
    masked_sum,
    policy_gradient_per_token,
)
from opd_sdk.objectives.base import MeanMetrics, PlanContext, frozen_copy, run_loss
from opd_sdk.objectives.params import ObjectiveContext, ObjectiveParams
from opd_sdk.rollout.batch import RolloutBatch
from opd_sdk.tensors.forward import Part, Plan, View
from opd_sdk.tensors.targets import count_failures, score_table
from opd_sdk.types import Feedback

Normalisation = Literal["token", "sequence"]
__all__ = ["RewardWeighted", "RewardWeightedParams"]


def _sample_std(values: list[float]) -> float:
    """Sample (n-1) standard deviation; 0.0 for fewer than two values."""
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


class RewardWeightedParams(ObjectiveParams):
    """RewardWeighted's parameters (YAML `objective.params`); see the class docstring."""

    advantage: AdvantageKind = "rloo"
    normalisation: Normalisation = "token"
    clip_eps: float | None = Field(None, gt=0.0, lt=1.0)
    clip_eps_high: float | None = None
    beta: float = Field(0.0, ge=0.0)
    kl_estimator: Literal["k1", "k3"] = "k3"
    kl_penalty: Literal["loss", "reward"] = "loss"
    grpo_eps: float = 1e-4
    chunk_rows: int = Field(DEFAULT_CHUNK_ROWS, gt=0)
    recompute_head: bool = False


class RewardWeighted:
    """Policy gradient on `Score` feedback; see the module docstring.

    Keyword arguments are the fields of `RewardWeightedParams` (defaults and
    bounds there; a bad value raises ConfigError), plus `reference`:

    advantage: "rloo" | "grpo" | "reinforce".
    normalisation: "token" | "sequence".
    clip_eps / clip_eps_high: PPO ratio clipping against the sampler's
        log-probs (None: plain on-policy gradient).
    beta: KL weight (0: no reference model is made or run).
    kl_estimator: "k1" | "k3"; kl_penalty: "loss" | "reward".
    reference: a frozen reference model; default a frozen copy of the
        policy made in setup() (only when beta > 0).
    chunk_rows: rows per LM-head chunk; recompute_head: recompute each
        chunk's logits in backward instead of keeping them (less memory).
    """

    feedback_kinds = ("score",)
    params_model = RewardWeightedParams

    def __init__(self, *, reference: torch.nn.Module | None = None, **params: Any) -> None:
        p = RewardWeightedParams.parse(params, "RewardWeighted")
        self.advantage = p.advantage
        self.normalisation = p.normalisation
        self.clip_eps = p.clip_eps
        self.clip_eps_high = p.clip_eps_high
        self.beta = p.beta
        self.kl_estimator = p.kl_estimator
        self.kl_penalty = p.kl_penalty
        self.reference = reference
        self.grpo_eps = p.grpo_eps
        self.chunk_rows = p.chunk_rows
        self.recompute_head = p.recompute_head
        # RLOO's and GRPO's baselines are the other samples of the prompt: one sample has no signal
        self.min_group_size = 2 if p.advantage in ("rloo", "grpo") else 1

    @classmethod
    def from_params(cls, params: RewardWeightedParams, ctx: ObjectiveContext) -> "RewardWeighted":
        return cls(**dict(params))

    @property
    def copies_student(self) -> bool:
        return self.beta > 0  # the KL reference

    def setup(self, policy: torch.nn.Module) -> None:
        if self.beta > 0 and self.reference is None:
            self.reference = frozen_copy(policy)

    def after_step(self, step: int, policy: torch.nn.Module) -> None:
        pass

    def temperature(self, batch: RolloutBatch) -> float:
        """The sampling temperature, as the sampler's log-probs were taken (and as TRL's GRPO does)."""
        return batch.temperature if batch.temperature > 0 else 1.0

    def frozen_models(self) -> dict[str, torch.nn.Module]:
        if self.beta == 0:
            return {}
        if self.reference is None:
            raise ConfigError("RewardWeighted with beta > 0 needs setup(policy) first (it makes the reference)")
        return {"reference": self.reference}

    def loss(self, policy: torch.nn.Module, batch: RolloutBatch, feedback: Sequence[Feedback]):
        return run_loss(self, policy, batch, feedback)

    def state_dict(self) -> dict[str, Any]:
        return {}  # nothing kept between steps

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def plan(self, batch: RolloutBatch, feedback: Sequence[Feedback], ctx: PlanContext) -> Plan:
        table = score_table(batch, feedback, "RewardWeighted", ctx.flat_tolerance)
        valid_PG, flat_P = table.valid_PG, table.flat_P
        valid_B = valid_PG.reshape(-1)
        mask_BT = batch.completion_mask_BT.float() * valid_B.unsqueeze(-1).float().to(batch.completion_mask_BT.device)
        failures = count_failures(feedback)
        metrics: dict[str, float] = {
            "missing_scores": float((~valid_PG).sum()) - failures * batch.group_size,
            "valid_samples": float(valid_B.sum()),
            "tokens": float(mask_BT.sum()),
            "flat_groups": float(flat_P.sum()),
        }
        advantages_PG = compute_advantages(self.advantage, table.rewards_PG, valid_PG, self.grpo_eps)
        advantages_PG[flat_P] = 0.0  # exactly: float rounding leaves 1e-16 on equal rewards
        advantages_B = advantages_PG.reshape(-1).float()
        signal_B = (valid_PG & ~flat_P.unsqueeze(-1)).reshape(-1)
        if self.beta == 0:  # rows with advantage 0 add nothing to the loss or its gradient: not run
            rows_B = valid_B & (advantages_B != 0)
            metrics["active_samples"] = float(rows_B.sum())
        else:  # the KL term reads every valid row
            rows_B = valid_B
        if self.beta == 0 or self.kl_penalty == "loss":
            metrics["advantage_abs_mean"] = float(advantages_PG[valid_PG].abs().mean()) if valid_PG.any() else 0.0
        return Plan(
            rows_B=rows_B,
            normaliser=mask_units(mask_BT, self.normalisation),
            signal=int((signal_B & rows_B).sum()),
            metrics=metrics,
            data={"mask_BT": mask_BT, "advantages_B": advantages_B, "rewards_PG": table.rewards_PG},
        )

    def compute(self, view: View, plan: Plan, part: Part, batch: RolloutBatch) -> tuple[torch.Tensor, MeanMetrics]:
        rows, T = part.rows, view.T
        temperature = self.temperature(batch)
        logprobs_RT = view.policy(temperature)
        mask_RT = plan.data["mask_BT"][rows, :T].to(logprobs_RT.device)
        advantages_R = plan.data["advantages_B"][rows].to(logprobs_RT.device)
        means: MeanMetrics = {}
        kl_RT = None
        if self.beta > 0:
            kl_RT = kl_per_token(logprobs_RT, view.policy(temperature, model="reference"), self.kl_estimator)
            means["kl"] = (masked_sum(kl_RT.detach(), mask_RT, "token"), mask_RT.sum())
            if self.kl_penalty == "reward":  # rows are whole valid groups here
                G = batch.group_size
                rewards_R = plan.data["rewards_PG"].reshape(-1)[rows].to(logprobs_RT.device)
                rewards_R = rewards_R - self.beta * (kl_RT.detach() * mask_RT).sum(-1).double()
                ones = torch.ones(len(rows) // G, G, dtype=torch.bool, device=rewards_R.device)
                advantages_R = compute_advantages(self.advantage, rewards_R.view(-1, G), ones, self.grpo_eps)
                advantages_R = advantages_R.reshape(-1).float()
                means["advantage_abs_mean"] = (advantages_R.abs().sum(), len(rows))
        old_RT = batch.sampler_logprobs_BT[rows, :T].float() if self.clip_eps is not None else None
        loss_RT, clipped_RT = policy_gradient_per_token(
            logprobs_RT, advantages_R, mask_RT, old_logprobs_BT=old_RT, clip_eps=self.clip_eps,
            clip_eps_high=self.clip_eps_high, weights_BT=view.weights,
        )
        pg_loss = masked_sum(loss_RT, mask_RT, self.normalisation) / plan.normaliser
        loss = pg_loss
        if kl_RT is not None and self.kl_penalty == "loss":
            loss = loss + self.beta * masked_sum(kl_RT, mask_RT, self.normalisation) / plan.normaliser
        means["pg_loss"] = (pg_loss.detach(), None)
        if self.clip_eps is not None:
            means["clip_fraction"] = (clipped_RT.sum(), (mask_RT > 0).sum())  # over the rows that were run
        return loss, means
