"""Per-token estimators of KL(student || reference) at the sampled tokens (Schulman 2020).

With log_ratio = log p_ref(y_t) - log p_S(y_t):
    k1 = -log_ratio                       (unbiased, can be negative)
    k3 = exp(log_ratio) - 1 - log_ratio   (unbiased, always >= 0)
k1 placed in the loss has zero expected gradient on-policy: use it as a
reward penalty; k3 is GRPO's in-loss choice.
"""

from __future__ import annotations

import torch

from opd_sdk.errors import ConfigError


def kl_per_token(logprobs_BT: torch.Tensor, ref_logprobs_BT: torch.Tensor, estimator: str) -> torch.Tensor:
    """[B, T] student and reference log-probs of the sampled tokens -> [B, T] KL estimate."""
    log_ratio_BT = ref_logprobs_BT - logprobs_BT
    if estimator == "k1":
        return -log_ratio_BT
    if estimator == "k3":
        return torch.exp(log_ratio_BT) - 1.0 - log_ratio_BT
    raise ConfigError(f"kl_estimator must be 'k1' or 'k3', got {estimator!r}")
