"""Rows for text the student did not sample (a reference answer, a teacher's text).

SFT and SPIN score text that is not in the RolloutBatch. We reuse the
batch's own prompt tokens (exactly what the student saw, chat template
included) and append the text tokenised with the student's tokenizer, plus
EOS, so a target row looks like a sampled row: [left-padded prompt | text,
right-padded], the text starting at column `batch.prompt_len`.

Token ids that a teacher sends with a `Reference` are ignored on purpose:
they are in the teacher's vocabulary, not the student's.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from opd_sdk.batch import RolloutBatch
from opd_sdk.errors import ConfigError


def encode_text(tokenizer: Any, text: str, append_eos: bool = True) -> list[int]:
    """Student token ids of `text` (no special tokens added), with EOS appended once."""
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    eos = getattr(tokenizer, "eos_token_id", None)
    if append_eos:
        if eos is None:
            raise ConfigError("the tokenizer has no eos_token_id; set one or pass append_eos=False")
        if not ids or ids[-1] != eos:
            ids.append(eos)
    if not ids:
        raise ConfigError(f"text {text!r} tokenises to nothing; give a non-empty answer")
    return ids


def text_rows(
    batch: RolloutBatch, items: Sequence[tuple[int, list[int]]], pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build rows [prompt of group p | ids] for items (p, ids) -> (input_ids_NT, attention_NT, target_mask_NT).

    N = len(items); T = batch.prompt_len + longest ids. target_mask_NT is 1.0
    on the appended ids (the positions whose log-probs the losses read).
    """
    G, L = batch.group_size, batch.prompt_len
    longest = max(len(ids) for _, ids in items)
    N, T = len(items), L + longest
    device = batch.input_ids_BT.device
    input_ids_NT = torch.full((N, T), pad_id, dtype=torch.long, device=device)
    attention_NT = torch.zeros(N, T, dtype=batch.attention_mask_BT.dtype, device=device)
    target_NT = torch.zeros(N, T, dtype=torch.float32, device=device)
    for n, (p, ids) in enumerate(items):
        row = p * G
        input_ids_NT[n, :L] = batch.input_ids_BT[row, :L]
        attention_NT[n, :L] = batch.attention_mask_BT[row, :L]
        input_ids_NT[n, L : L + len(ids)] = torch.tensor(ids, dtype=torch.long, device=device)
        attention_NT[n, L : L + len(ids)] = 1
        target_NT[n, L : L + len(ids)] = 1.0
    return input_ids_NT, attention_NT, target_NT
