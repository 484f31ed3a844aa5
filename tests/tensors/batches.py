"""A RolloutBatch written by hand, for the targets and forward tests."""

from __future__ import annotations

import torch

from opd_sdk.data import PromptItem
from opd_sdk.rollout.batch import RolloutBatch
from opd_sdk.types import Completion

PAD = 0


def make_batch(
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    group_size: int,
    answers: list[str | None] | None = None,
) -> RolloutBatch:
    """Rows prompt-major: [left-padded prompt | completion, right-padded]; sampler log-probs 0."""
    P = len(prompt_ids)
    L = max(len(p) for p in prompt_ids)
    B, T = P * group_size, L + max(len(c) for c in completion_ids)
    input_ids = torch.full((B, T), PAD, dtype=torch.long)
    attention = torch.zeros(B, T, dtype=torch.long)
    completion_mask = torch.zeros(B, T)
    for b, completion in enumerate(completion_ids):
        prompt = prompt_ids[b // group_size]
        input_ids[b, L - len(prompt) : L] = torch.tensor(prompt)
        input_ids[b, L : L + len(completion)] = torch.tensor(completion)
        attention[b, L - len(prompt) : L + len(completion)] = 1
        completion_mask[b, L : L + len(completion)] = 1.0
    answers = answers or [None] * P
    return RolloutBatch(
        prompts=[PromptItem(prompt=f"prompt {p}", answer=answers[p]) for p in range(P)],
        group_size=group_size,
        input_ids_BT=input_ids,
        attention_mask_BT=attention,
        completion_mask_BT=completion_mask,
        sampler_logprobs_BT=torch.zeros(B, T),
        prompt_len=L,
        completions=[Completion(text=" ".join(map(str, c)), token_ids=c) for c in completion_ids],
    )
