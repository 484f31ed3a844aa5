"""Losses: pure functions of tensors, one module each, shapes in the docstrings.

Each returns a SUM over its units (tokens, sequences, pairs) or the per-unit
values; the caller divides by the unit count of the whole batch, so gradient
accumulation over micro-batches gives exactly the one-big-batch gradient.

- `advantages`: REINFORCE / RLOO / GRPO advantages from rewards per group.
- `policy_gradient`: the clipped surrogate, masked sums and means, truncated importance weights.
- `kl`: per-token KL(student || reference) estimators k1, k3.
- `token_divergence`: reverse-KL policy gradient, and f-divergences over a top-k support.
- `preference`: DPO / IPO (online DPO) and SPIN's self-play loss.
- `nll`: negative log-likelihood (SFT, rejection sampling).
"""
