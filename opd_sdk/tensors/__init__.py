"""Tensors: feedback and the policy as tensors, for the losses.

`targets`: Feedback -> tensors, once per batch (rewards, validity, teacher token
log-probs and their top-k support, preference pairs, tokenised references).
`forward`: one policy pass per micro-batch, read by every objective term (`Plan`,
`Part`, `View`).
May import: the shared vocabulary, `rollout`, `losses`.
"""
