"""`RolloutBatch`: what the rollout engine hands the objectives.

Rows are laid out prompt-major: row b = prompt b // G, sample b % G, where G
is `group_size`. Each row is [left-padded prompt | completion, right-padded],
so every completion starts at column `prompt_len`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd_sdk.data import PromptItem
from opd_sdk.types import Completion


@dataclass
class RolloutBatch:
    prompts: list[PromptItem]  # P prompts
    group_size: int  # G samples per prompt; B = P * G rows
    input_ids_BT: torch.Tensor  # long [B, T]: prompt + completion tokens
    attention_mask_BT: torch.Tensor  # long [B, T]: 1 on real tokens
    completion_mask_BT: torch.Tensor  # float [B, T]: 1 on sampled tokens (EOS included)
    sampler_logprobs_BT: torch.Tensor  # float [B, T]: log p_student(y_t) at sampling, 0 off-mask
    prompt_len: int  # completions start at this column
    completions: list[Completion]  # B completions (text + token ids)

    @property
    def size(self) -> int:
        return self.input_ids_BT.shape[0]

    def group_of(self, row: int) -> int:
        return row // self.group_size
