"""The policy-gradient surrogate and its reductions.

Per token, with ratio_t = exp(logp_t - old_t) (old = the detached current
log-probs when not clipping: value 1, gradient exactly REINFORCE's):
    loss_t = -min(ratio_t * A, clip(ratio_t, 1 - eps, 1 + eps_high) * A)
(PPO, Schulman et al. 2017; eps_high as in DAPO, Yu et al. 2025), times an
optional detached per-token weight (truncated importance sampling, below).

Reductions: "token" sums over every valid token and divides by the batch's
token count (DAPO); "sequence" averages each row over its own tokens, then
over rows (the GRPO paper).

Truncated importance sampling (TIS; Yao et al. 2025, "Your efficient RL
framework secretly brings you off-policy RL training"): samples drawn by
another engine (vLLM) or by older weights are reweighted per token by
min(p_trainer(y_t) / p_sampler(y_t), cap), detached.
"""

from __future__ import annotations

import torch

from opd_sdk.errors import ConfigError

NORMALISATIONS = ("token", "sequence")


def masked_sum(per_token_BT: torch.Tensor, mask_BT: torch.Tensor, normalisation: str) -> torch.Tensor:
    """The numerator of a masked mean -> [].

    token: sum(x * m). sequence: sum over rows with any token of sum_t(x * m) / sum_t(m).
    Positions off the mask never propagate NaN or inf.
    """
    x = torch.where(mask_BT > 0, per_token_BT, torch.zeros_like(per_token_BT)) * mask_BT
    if normalisation == "token":
        return x.sum()
    if normalisation == "sequence":
        n_B = mask_BT.sum(-1)
        return (x.sum(-1) / n_B.clamp(min=1.0) * (n_B > 0).to(x.dtype)).sum()
    raise ConfigError(f"normalisation must be 'token' or 'sequence', got {normalisation!r}")


def mask_units(mask_BT: torch.Tensor, normalisation: str) -> float:
    """The denominator that goes with `masked_sum`: tokens, or rows with any token."""
    if normalisation == "token":
        return float(mask_BT.sum())
    return float((mask_BT.sum(-1) > 0).sum())


def masked_normalise(per_token_BT: torch.Tensor, mask_BT: torch.Tensor, normalisation: str) -> torch.Tensor:
    """Masked mean over this tensor alone ([B, T] -> []); an all-zero mask gives 0."""
    return masked_sum(per_token_BT, mask_BT, normalisation) / max(mask_units(mask_BT, normalisation), 1.0)


def truncated_importance_weights(
    logprobs_BT: torch.Tensor, sampler_logprobs_BT: torch.Tensor, mask_BT: torch.Tensor, cap: float
) -> torch.Tensor:
    """min(exp(logp - sampler_logp), cap) per token, detached, 1 off the mask -> [B, T]."""
    log_ratio_BT = torch.where(mask_BT > 0, logprobs_BT.detach() - sampler_logprobs_BT, torch.zeros_like(logprobs_BT))
    return torch.exp(log_ratio_BT).clamp(max=cap)


def policy_gradient_per_token(
    logprobs_BT: torch.Tensor,
    advantages_B: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    old_logprobs_BT: torch.Tensor | None = None,
    clip_eps: float | None = None,
    clip_eps_high: float | None = None,
    weights_BT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped-surrogate loss -> (loss_BT, clipped_BT bool).

    advantages_B: one value per row; weights_BT: detached per-token weights (TIS) or None.
    """
    old_BT = logprobs_BT.detach() if old_logprobs_BT is None else old_logprobs_BT
    on = mask_BT > 0
    ratio_BT = torch.exp(torch.where(on, logprobs_BT - old_BT, torch.zeros_like(logprobs_BT)))
    adv_BT = advantages_B.unsqueeze(-1).to(ratio_BT.dtype)
    surrogate_BT = ratio_BT * adv_BT
    clipped_BT = torch.zeros_like(on)
    if clip_eps is not None:
        high = clip_eps if clip_eps_high is None else clip_eps_high
        bounded_BT = torch.clamp(ratio_BT, 1.0 - clip_eps, 1.0 + high) * adv_BT
        clipped_BT = (bounded_BT < surrogate_BT) & on
        surrogate_BT = torch.minimum(surrogate_BT, bounded_BT)
    loss_BT = -surrogate_BT if weights_BT is None else -surrogate_BT * weights_BT
    return loss_BT, clipped_BT


def policy_gradient_loss(
    logprobs_BT: torch.Tensor,
    advantages_B: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    old_logprobs_BT: torch.Tensor | None = None,
    clip_eps: float | None = None,
    clip_eps_high: float | None = None,
    normalisation: str = "token",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The surrogate averaged over this tensor's own valid tokens -> (loss [], clip_fraction [])."""
    loss_BT, clipped_BT = policy_gradient_per_token(
        logprobs_BT, advantages_B, mask_BT, old_logprobs_BT=old_logprobs_BT, clip_eps=clip_eps,
        clip_eps_high=clip_eps_high,
    )
    clip_fraction = clipped_BT.sum() / (mask_BT > 0).sum().clamp(min=1)
    return masked_normalise(loss_BT, mask_BT, normalisation), clip_fraction.detach()
