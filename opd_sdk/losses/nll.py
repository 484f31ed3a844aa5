"""Negative log-likelihood of given tokens (SFT, rejection sampling)."""

from __future__ import annotations

import torch


def nll_sum(logprobs_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """-sum(logp * m) over the masked tokens -> [] (divide by the batch's token count)."""
    return -(logprobs_BT * mask_BT).sum()


def nll_loss(logprobs_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Token-mean NLL of this tensor alone: -sum(logp * m) / sum(m) ([B, T] -> [])."""
    return nll_sum(logprobs_BT, mask_BT) / mask_BT.sum().clamp(min=1.0)
