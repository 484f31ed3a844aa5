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
  `batch.sampler_logprobs_BT`, so one batch can be reused for several
  steps. The policy's log-probs are taken at `batch.temperature` (logits /
  temperature, as the sampler's were, and as TRL's GRPO does), so the ratio
  compares like with like. Without clipping the ratio is taken against the detached current
  log-probs: value 1, gradient exactly REINFORCE's.
- KL to a frozen reference, per token, with log_ratio = log p_ref - log p_S
  (Schulman's estimators): k1 = -log_ratio, k3 = exp(log_ratio) - 1 - log_ratio.
  `kl_penalty="loss"` adds beta * kl to the loss (GRPO's choice, with k3);
  `"reward"` subtracts beta * sum_t kl_t (detached) from each reward before
  the advantages (PPO-RLHF / RLOO's choice, usually with k1). Note that k1
  placed in the loss has zero expected gradient on-policy; use it in the
  reward.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from opd_sdk.batch import RolloutBatch
from opd_sdk.errors import ConfigError
from opd_sdk.logprobs import selected_logprobs
from opd_sdk.objectives.advantages import ADVANTAGE_KINDS, AdvantageKind, compute_advantages
from opd_sdk.objectives.base import (
    LossOutput,
    count_failures,
    first_param_zero,
    frozen_copy,
    sample_std,
    score_table,
    sequence_sums,
)
from opd_sdk.types import Feedback

Normalisation = Literal["token", "sequence"]


def kl_per_token(logprobs_BT: torch.Tensor, ref_logprobs_BT: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(student || reference) at the sampled tokens -> [B, T].

    log_ratio = ref - student. k1 = -log_ratio (unbiased, can be negative);
    k3 = exp(log_ratio) - 1 - log_ratio (unbiased, always >= 0).
    """
    log_ratio_BT = ref_logprobs_BT - logprobs_BT
    if estimator == "k1":
        return -log_ratio_BT
    if estimator == "k3":
        return torch.exp(log_ratio_BT) - 1.0 - log_ratio_BT
    raise ConfigError(f"kl_estimator must be 'k1' or 'k3', got {estimator!r}")


def masked_normalise(per_token_BT: torch.Tensor, mask_BT: torch.Tensor, normalisation: str) -> torch.Tensor:
    """Reduce a per-token quantity to a scalar over mask_BT ([B, T] -> []).

    token: sum(x * m) / sum(m). sequence: mean over rows with any token of
    sum_t(x * m) / sum_t(m). An all-zero mask gives 0 (still on the graph).
    """
    x = torch.where(mask_BT > 0, per_token_BT, torch.zeros_like(per_token_BT)) * mask_BT
    if normalisation == "token":
        return x.sum() / mask_BT.sum().clamp(min=1.0)
    if normalisation == "sequence":
        n_B = mask_BT.sum(-1)
        rows_B = (n_B > 0).to(x.dtype)
        per_row_B = x.sum(-1) / n_B.clamp(min=1.0)
        return (per_row_B * rows_B).sum() / rows_B.sum().clamp(min=1.0)
    raise ConfigError(f"normalisation must be 'token' or 'sequence', got {normalisation!r}")


def policy_gradient_loss(
    logprobs_BT: torch.Tensor,
    advantages_B: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    old_logprobs_BT: torch.Tensor | None = None,
    clip_eps: float | None = None,
    clip_eps_high: float | None = None,
    normalisation: Normalisation = "token",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped-surrogate policy-gradient loss -> (loss [], clip_fraction []).

    ratio_t = exp(logp_t - old_t) (old = logp.detach() when None);
    per-token loss = -min(ratio_t * A, clip(ratio_t, 1 - eps, 1 + eps_high) * A)
    (no clipping when clip_eps is None: -ratio_t * A), reduced by
    `masked_normalise`. advantages_B is one value per row; mask_BT selects the
    valid completion tokens.
    """
    old_BT = logprobs_BT.detach() if old_logprobs_BT is None else old_logprobs_BT
    on = mask_BT > 0
    log_ratio_BT = torch.where(on, logprobs_BT - old_BT, torch.zeros_like(logprobs_BT))
    ratio_BT = torch.exp(log_ratio_BT)
    adv_BT = advantages_B.unsqueeze(-1).to(ratio_BT.dtype)
    surrogate_BT = ratio_BT * adv_BT
    clip_fraction = torch.zeros((), dtype=ratio_BT.dtype)
    if clip_eps is not None:
        high = clip_eps if clip_eps_high is None else clip_eps_high
        clipped_BT = torch.clamp(ratio_BT, 1.0 - clip_eps, 1.0 + high) * adv_BT
        surrogate_BT = torch.minimum(surrogate_BT, clipped_BT)
        was_clipped = (clipped_BT < ratio_BT * adv_BT) & on
        clip_fraction = was_clipped.sum() / on.sum().clamp(min=1)
    return masked_normalise(-surrogate_BT, mask_BT, normalisation), clip_fraction.detach()


class RewardWeighted:
    """Policy gradient on `Score` feedback; see the module docstring.

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

    def __init__(
        self,
        *,
        advantage: AdvantageKind = "rloo",
        normalisation: Normalisation = "token",
        clip_eps: float | None = None,
        clip_eps_high: float | None = None,
        beta: float = 0.0,
        kl_estimator: Literal["k1", "k3"] = "k3",
        kl_penalty: Literal["loss", "reward"] = "loss",
        reference: torch.nn.Module | None = None,
        grpo_eps: float = 1e-4,
        chunk_rows: int = 4,
        recompute_head: bool = False,
    ) -> None:
        if advantage not in ADVANTAGE_KINDS:
            raise ConfigError(f"advantage must be one of {ADVANTAGE_KINDS}, got {advantage!r}")
        if normalisation not in ("token", "sequence"):
            raise ConfigError(f"normalisation must be 'token' or 'sequence', got {normalisation!r}")
        if clip_eps is not None and not 0.0 < clip_eps < 1.0:
            raise ConfigError(f"clip_eps must be in (0, 1) (e.g. 0.2) or None, got {clip_eps}")
        if beta < 0:
            raise ConfigError(f"beta (KL weight) must be >= 0, got {beta}")
        if kl_estimator not in ("k1", "k3") or kl_penalty not in ("loss", "reward"):
            raise ConfigError("kl_estimator must be 'k1' or 'k3' and kl_penalty 'loss' or 'reward'")
        self.advantage = advantage
        self.normalisation = normalisation
        self.clip_eps = clip_eps
        self.clip_eps_high = clip_eps_high
        self.beta = beta
        self.kl_estimator = kl_estimator
        self.kl_penalty = kl_penalty
        self.reference = reference
        self.grpo_eps = grpo_eps
        self.chunk_rows = chunk_rows
        self.recompute_head = recompute_head

    def setup(self, policy: torch.nn.Module) -> None:
        if self.beta > 0 and self.reference is None:
            self.reference = frozen_copy(policy)

    def after_step(self, step: int, policy: torch.nn.Module) -> None:
        pass

    def loss(self, policy: torch.nn.Module, batch: RolloutBatch, feedback: Sequence[Feedback]) -> LossOutput:
        rewards_PG, valid_PG = score_table(batch, feedback, "RewardWeighted")
        P, G = rewards_PG.shape
        valid_B = valid_PG.reshape(-1)
        mask_BT = batch.completion_mask_BT.float() * valid_B.unsqueeze(-1).float()
        failures = count_failures(feedback)
        metrics: dict[str, float] = {
            "feedback_failures": float(failures),
            "nonfinite_score_groups": float((~valid_PG.any(-1)).sum()) - failures,
            "valid_samples": float(valid_B.sum()),
            "tokens": float(mask_BT.sum()),
        }
        valid_rewards = rewards_PG[valid_PG].tolist()
        if not valid_rewards:
            return LossOutput(first_param_zero(policy), {**metrics, "loss": 0.0})
        metrics["reward_mean"] = sum(valid_rewards) / len(valid_rewards)
        metrics["reward_std"] = sample_std(valid_rewards)
        if self.beta > 0:
            return self._loss_with_kl(policy, batch, rewards_PG, valid_PG, mask_BT, metrics)

        # beta = 0: rows whose advantage is 0 (a group with equal rewards) add nothing to the loss
        # or its gradient, so only the other rows are run; the normaliser still counts every valid row.
        advantages_PG = compute_advantages(self.advantage, rewards_PG, valid_PG, self.grpo_eps)
        advantages_B = advantages_PG.reshape(-1).float()
        metrics["advantage_abs_mean"] = float(advantages_PG[valid_PG].abs().mean())
        active_B = valid_B & (advantages_B != 0)
        metrics["active_samples"] = float(active_B.sum())
        if not active_B.any():
            return LossOutput(first_param_zero(policy), {**metrics, "pg_loss": 0.0, "loss": 0.0})
        rows = active_B.nonzero().squeeze(-1).to(batch.input_ids_BT.device)
        sub_mask_BT = mask_BT[rows]
        pg_loss, clip_fraction = policy_gradient_loss(
            self._logprobs(policy, batch, rows),
            advantages_B[rows],
            sub_mask_BT,
            old_logprobs_BT=batch.sampler_logprobs_BT[rows].float() if self.clip_eps is not None else None,
            clip_eps=self.clip_eps,
            clip_eps_high=self.clip_eps_high,
            normalisation=self.normalisation,
        )
        if self.normalisation == "token":  # subset mean -> mean over all valid tokens
            loss = pg_loss * (sub_mask_BT.sum() / mask_BT.sum())
        else:  # subset mean over rows -> mean over all valid rows
            loss = pg_loss * (len(rows) / float((mask_BT.sum(-1) > 0).sum()))
        if self.clip_eps is not None:
            metrics["clip_fraction"] = float(clip_fraction)  # over the rows that were run
        metrics["pg_loss"] = metrics["loss"] = float(loss.detach())
        return LossOutput(loss, metrics)

    def _logprobs(self, model: torch.nn.Module, batch: RolloutBatch, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Log-probs of the sampled tokens at the sampling temperature (all rows, or `rows`) -> [B, T]."""
        ids_BT = batch.input_ids_BT if rows is None else batch.input_ids_BT[rows]
        attn_BT = batch.attention_mask_BT if rows is None else batch.attention_mask_BT[rows]
        return selected_logprobs(
            model,
            ids_BT,
            attn_BT,
            chunk_rows=self.chunk_rows,
            temperature=getattr(batch, "temperature", 1.0),
            from_col=batch.prompt_len,
            recompute_head=self.recompute_head,
        )

    def _loss_with_kl(self, policy, batch, rewards_PG, valid_PG, mask_BT, metrics) -> LossOutput:
        """beta > 0: every valid row is run (the KL term involves all of them), and the reference too."""
        if self.reference is None:
            raise ConfigError("RewardWeighted with beta > 0 needs setup(policy) first (it makes the reference)")
        P, G = rewards_PG.shape
        logprobs_BT = self._logprobs(policy, batch)
        with torch.no_grad():
            ref_BT = self._logprobs(self.reference, batch)
        kl_BT = kl_per_token(logprobs_BT, ref_BT, self.kl_estimator)
        metrics["kl"] = float(masked_normalise(kl_BT.detach(), mask_BT, "token"))
        if self.kl_penalty == "reward":
            kl_sum_PG = sequence_sums(kl_BT.detach(), mask_BT).double().view(P, G)
            rewards_PG = rewards_PG - self.beta * kl_sum_PG
        advantages_PG = compute_advantages(self.advantage, rewards_PG, valid_PG, self.grpo_eps)
        metrics["advantage_abs_mean"] = float(advantages_PG[valid_PG].abs().mean())
        pg_loss, clip_fraction = policy_gradient_loss(
            logprobs_BT,
            advantages_PG.reshape(-1).float(),
            mask_BT,
            old_logprobs_BT=batch.sampler_logprobs_BT.float() if self.clip_eps is not None else None,
            clip_eps=self.clip_eps,
            clip_eps_high=self.clip_eps_high,
            normalisation=self.normalisation,
        )
        loss = pg_loss
        if self.kl_penalty == "loss":
            loss = loss + self.beta * masked_normalise(kl_BT, mask_BT, self.normalisation)
        if self.clip_eps is not None:
            metrics["clip_fraction"] = float(clip_fraction)
        metrics["pg_loss"] = float(pg_loss.detach())
        metrics["loss"] = float(loss.detach())
        return LossOutput(loss, metrics)
