"""Rollout: the student samples its own completions.

Owns `RolloutBatch` (prompt + completion token ids, masks, sampler log-probs), the
`RolloutEngine` protocol and its engines (transformers `generate`, vLLM colocated,
vLLM server), `build_rollout_engine`, and `logprobs` (log-probabilities of given tokens
without a full-vocabulary log-softmax, shared by the sampler and the forward layer).
May import: the shared vocabulary and `parallel` (is a model sharded).
"""
