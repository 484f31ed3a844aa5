"""Log-probabilities of given tokens without a full-batch log-softmax.

The LM head's output over the vocabulary for a whole batch is the largest
tensor in a training step ([B, T, V] floats). We run the trunk once, then
push the hidden states through the head a few rows at a time and keep only
the log-probability of the token that was actually there.
"""

from __future__ import annotations

import torch


def selected_logprobs(
    model: torch.nn.Module,
    input_ids_BT: torch.Tensor,
    attention_mask_BT: torch.Tensor,
    *,
    chunk_rows: int = 4,
    temperature: float = 1.0,
) -> torch.Tensor:
    """logprobs_BT[b, t] = log p(input_ids[b, t] | input_ids[b, :t]); column 0 is 0.

    Works for any Hugging Face causal LM (uses `model.model` trunk and
    `model.get_output_embeddings()` head when present, else full logits).
    Gradients flow when called under grad mode.
    """
    position_ids_BT = (attention_mask_BT.cumsum(-1) - 1).clamp(min=0)
    head = model.get_output_embeddings()
    trunk = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    B, T = input_ids_BT.shape
    out_BT = torch.zeros(B, T, dtype=torch.float32, device=input_ids_BT.device)
    if trunk is None or head is None or trunk is model:
        logits_BTV = model(
            input_ids=input_ids_BT, attention_mask=attention_mask_BT, position_ids=position_ids_BT
        ).logits
        hidden_BTH, head = None, None
    else:
        hidden_BTH = trunk(
            input_ids=input_ids_BT, attention_mask=attention_mask_BT, position_ids=position_ids_BT
        ).last_hidden_state
    rows = []
    for start in range(0, B, chunk_rows):
        sl = slice(start, start + chunk_rows)
        logits = head(hidden_BTH[sl, :-1]) if head is not None else logits_BTV[sl, :-1]
        logits = logits.float() / temperature
        targets = input_ids_BT[sl, 1:]
        picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(logits, dim=-1))
    out_BT = torch.cat([torch.zeros(B, 1, device=input_ids_BT.device), torch.cat(rows, 0)], dim=1)
    return out_BT
