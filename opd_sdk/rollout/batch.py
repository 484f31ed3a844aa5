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
    completions: list[Completion]  # B completions (text + token ids, EOS included when sampled)
    temperature: float = 1.0  # sampler_logprobs_BT are log softmax(logits / temperature)

    @property
    def size(self) -> int:
        return self.input_ids_BT.shape[0]

    def group_of(self, row: int) -> int:
        return row // self.group_size

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)

    def completion_tokens(self) -> int:
        """How many tokens the student sampled in this batch (EOS included)."""
        return int(self.completion_mask_BT.sum().item())

    def completions_of(self, prompt_index: int) -> list[Completion]:
        """The G completions of one prompt, in sampling order."""
        G = self.group_size
        return self.completions[prompt_index * G : (prompt_index + 1) * G]

    def select_prompts(self, start: int, stop: int) -> "RolloutBatch":
        """The sub-batch of prompts [start, stop) with all their samples.

        Columns after the longest completion in the slice are dropped (they
        are padding there); the prompt columns are kept, so `prompt_len`
        stays valid.
        """
        G = self.group_size
        rows = slice(start * G, stop * G)
        used_T = self.attention_mask_BT[rows].sum(0) > 0
        last = int(used_T.nonzero().max().item()) + 1 if used_T.any() else self.prompt_len
        T = max(last, self.prompt_len)
        return RolloutBatch(
            prompts=self.prompts[start:stop],
            group_size=G,
            input_ids_BT=self.input_ids_BT[rows, :T],
            attention_mask_BT=self.attention_mask_BT[rows, :T],
            completion_mask_BT=self.completion_mask_BT[rows, :T],
            sampler_logprobs_BT=self.sampler_logprobs_BT[rows, :T],
            prompt_len=self.prompt_len,
            completions=self.completions[rows],
            temperature=self.temperature,
        )

    def micro_batches(self, prompts_per_micro: int) -> list[tuple[int, "RolloutBatch"]]:
        """Split by whole prompt groups for gradient accumulation.

        Returns (first prompt index, sub-batch) pairs. Keeping a group in one
        micro-batch keeps group-relative advantages (RLOO, GRPO) exact.
        """
        if prompts_per_micro < 1:
            raise ValueError(f"prompts_per_micro must be >= 1, got {prompts_per_micro}")
        P = self.num_prompts
        return [(s, self.select_prompts(s, min(s + prompts_per_micro, P))) for s in range(0, P, prompts_per_micro)]

    @classmethod
    def concat(cls, batches: list["RolloutBatch"], pad_id: int = 0) -> "RolloutBatch":
        """One batch of the batches' prompt groups, in order (every rank's share of a step).

        Rows are re-padded to the widest prompt (on the left) and the longest
        completion (on the right), so completions start at one `prompt_len`.
        Raises ValueError when group sizes or temperatures differ.
        """
        first = batches[0]
        if len(batches) == 1:
            return first
        if any(b.group_size != first.group_size or b.temperature != first.temperature for b in batches):
            raise ValueError("cannot concatenate rollout batches with different group sizes or temperatures")
        L = max(b.prompt_len for b in batches)
        C = max(b.input_ids_BT.shape[1] - b.prompt_len for b in batches)

        def pad(x: torch.Tensor, b: "RolloutBatch", value: float) -> torch.Tensor:
            left, right = L - b.prompt_len, C - (x.shape[1] - b.prompt_len)
            return torch.nn.functional.pad(x, (left, right), value=value)

        return cls(
            prompts=[p for b in batches for p in b.prompts],
            group_size=first.group_size,
            input_ids_BT=torch.cat([pad(b.input_ids_BT, b, pad_id) for b in batches]),
            attention_mask_BT=torch.cat([pad(b.attention_mask_BT, b, 0) for b in batches]),
            completion_mask_BT=torch.cat([pad(b.completion_mask_BT, b, 0.0) for b in batches]),
            sampler_logprobs_BT=torch.cat([pad(b.sampler_logprobs_BT, b, 0.0) for b in batches]),
            prompt_len=L,
            completions=[c for b in batches for c in b.completions],
            temperature=first.temperature,
        )

    def to(self, device: torch.device | str) -> "RolloutBatch":
        return RolloutBatch(
            prompts=self.prompts,
            group_size=self.group_size,
            input_ids_BT=self.input_ids_BT.to(device),
            attention_mask_BT=self.attention_mask_BT.to(device),
            completion_mask_BT=self.completion_mask_BT.to(device),
            sampler_logprobs_BT=self.sampler_logprobs_BT.to(device),
            prompt_len=self.prompt_len,
            completions=self.completions,
            temperature=self.temperature,
        )

    def to_json(self) -> dict:
        """Plain JSON data (exact: float32 values round-trip through Python floats); see `from_json`."""
        return {
            "prompts": [p.model_dump(mode="json") for p in self.prompts],
            "group_size": self.group_size,
            "input_ids": self.input_ids_BT.tolist(),
            "attention_mask": self.attention_mask_BT.tolist(),
            "completion_mask": self.completion_mask_BT.tolist(),
            "sampler_logprobs": self.sampler_logprobs_BT.float().tolist(),
            "prompt_len": self.prompt_len,
            "completions": [c.model_dump(mode="json") for c in self.completions],
            "temperature": self.temperature,
        }

    @classmethod
    def from_json(cls, data: dict, device: torch.device | str = "cpu") -> "RolloutBatch":
        return cls(
            prompts=[PromptItem.model_validate(p) for p in data["prompts"]],
            group_size=data["group_size"],
            input_ids_BT=torch.tensor(data["input_ids"], dtype=torch.long, device=device),
            attention_mask_BT=torch.tensor(data["attention_mask"], dtype=torch.long, device=device),
            completion_mask_BT=torch.tensor(data["completion_mask"], dtype=torch.float32, device=device),
            sampler_logprobs_BT=torch.tensor(data["sampler_logprobs"], dtype=torch.float32, device=device),
            prompt_len=data["prompt_len"],
            completions=[Completion.model_validate(c) for c in data["completions"]],
            temperature=data["temperature"],
        )
