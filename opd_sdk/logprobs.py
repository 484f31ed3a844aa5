"""Log-probabilities of given tokens without a full-batch log-softmax.

The LM head's output over the vocabulary for a whole batch is the largest
tensor in a training step ([B, T, V] floats). We run the trunk once, then
push the hidden states through the head a few rows at a time and keep only
the log-probability of the token that was actually there.

Works for plain Hugging Face causal LMs and for peft-wrapped ones (LoRA
layers are injected into the trunk in place, so calling the unwrapped trunk
still runs the adapters).
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint


def _trunk_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
    """(decoder trunk, LM head) of a causal LM, or (None, None) when we cannot split it safely."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    config = getattr(base, "config", None)
    # Heads that post-process logits (Gemma-2 soft-capping, Cohere scaling) need the full forward.
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None, None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    trunk = None
    if hasattr(base, "get_decoder"):
        try:
            trunk = base.get_decoder()
        except (AttributeError, NotImplementedError):
            trunk = None
    if trunk is None:
        trunk = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    if trunk is None or head is None or trunk is base:
        return None, None
    return trunk, head


def selected_logprobs(
    model: torch.nn.Module,
    input_ids_BT: torch.Tensor,
    attention_mask_BT: torch.Tensor,
    *,
    chunk_rows: int = 4,
    temperature: float = 1.0,
    recompute_head: bool = False,
    from_col: int = 1,
) -> torch.Tensor:
    """logprobs_BT[b, t] = log softmax(logits / temperature)[input_ids[b, t]] given input_ids[b, :t].

    Column 0 is 0 (no context); so is every column before `from_col` (pass
    `batch.prompt_len` to skip the LM head on prompt tokens, whose
    log-probs an on-policy loss never reads). Rows may be left-padded: position ids are
    counted from the first real token, as `generate` does. Gradients flow
    when called under grad mode; the log-softmax is taken in float32 even
    under bf16 autocast. recompute_head=True keeps only the hidden states for
    backward and recomputes each chunk's logits there (activation
    checkpointing of the head): less memory, about one extra head matmul.
    """
    if temperature <= 0:
        raise ValueError("temperature must be > 0 for log-probabilities (greedy has none)")
    position_ids_BT = (attention_mask_BT.long().cumsum(-1) - 1).clamp(min=0)
    trunk, head = _trunk_and_head(model)
    B, T = input_ids_BT.shape
    kwargs = dict(input_ids=input_ids_BT, attention_mask=attention_mask_BT, position_ids=position_ids_BT)
    if trunk is None:
        logits_BTV = model(**kwargs, use_cache=False).logits
        hidden_BTH = None
    else:
        hidden_BTH = trunk(**kwargs, use_cache=False).last_hidden_state
    def chunk_logprobs(inputs_RTX: torch.Tensor, targets_RT: torch.Tensor) -> torch.Tensor:
        logits_RTV = (head(inputs_RTX) if hidden_BTH is not None else inputs_RTX).float()
        if temperature != 1.0:
            logits_RTV = logits_RTV / temperature
        picked_RT = logits_RTV.gather(-1, targets_RT.unsqueeze(-1)).squeeze(-1)
        return picked_RT - torch.logsumexp(logits_RTV, dim=-1)

    from_col = max(1, min(from_col, T))
    source_BTX = hidden_BTH if hidden_BTH is not None else logits_BTV
    rows = []
    for start in range(0, B, chunk_rows):
        sl = slice(start, start + chunk_rows)
        inputs, targets = source_BTX[sl, from_col - 1 : -1], input_ids_BT[sl, from_col:]
        if recompute_head and hidden_BTH is not None and torch.is_grad_enabled():
            rows.append(torch.utils.checkpoint.checkpoint(chunk_logprobs, inputs, targets, use_reentrant=False))
        else:
            rows.append(chunk_logprobs(inputs, targets))
    zeros_BF = torch.zeros(B, from_col, device=input_ids_BT.device)
    return torch.cat([zeros_BF, torch.cat(rows, 0)], dim=1)
