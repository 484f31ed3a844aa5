"""Log-probabilities of given tokens without a full-batch log-softmax.

The LM head's output over the vocabulary for a whole batch is the largest
tensor in a training step ([B, T, V] floats). We run the trunk once, then
push the hidden states through the head a few rows at a time and keep only
the log-probability of the token that was actually there.

Works for plain Hugging Face causal LMs and for peft-wrapped ones (LoRA
layers are injected into the trunk in place, so calling the unwrapped trunk
still runs the adapters). An FSDP2-sharded model (`opd_sdk.parallel.fsdp.shard_model`) runs its root
forward instead of the bare trunk, so the sharded weights are gathered (`_hidden_through_root`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.utils.checkpoint

from opd_sdk.parallel.fsdp import is_sharded


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


def shared_prefix_group(input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor, prefix_len: int) -> int:
    """G when the rows come in consecutive runs of G with identical first `prefix_len` columns
    (a prompt-major rollout batch: G samples per prompt), else 1."""
    B = input_ids_BT.shape[0]
    if prefix_len < 1 or B < 2:
        return 1
    ids_BL, mask_BL = input_ids_BT[:, :prefix_len], attention_mask_BT[:, :prefix_len]
    same_as_first = ((ids_BL == ids_BL[:1]).all(-1) & (mask_BL == mask_BL[:1]).all(-1)).tolist()
    G = same_as_first.index(False) if False in same_as_first else B
    if G < 2 or B % G:
        return 1
    heads_ids, heads_mask = ids_BL[::G].repeat_interleave(G, 0), mask_BL[::G].repeat_interleave(G, 0)
    if not (torch.equal(heads_ids, ids_BL) and torch.equal(heads_mask, mask_BL)):
        return 1
    return G


def _uses_activation_checkpointing(module: torch.nn.Module) -> bool:
    return module.training and any(getattr(m, "gradient_checkpointing", False) is True for m in module.modules())


def _hidden_with_shared_prefix(trunk, input_ids_BT, attention_mask_BT, position_ids_BT, prefix_len, G):
    """Hidden states at positions prefix_len-1 .. T-2, running each distinct prefix once.

    The prefix of each group is encoded once (with gradients) and its KV
    cache repeated G times; the completions then attend to it. Gradients flow
    back through the repeated cache into the one prefix forward. Returns None
    when the model does not hand back a cache.
    """
    L = prefix_len
    # transformers >= 5.2x names the cache argument `cache`; older releases `past_key_values`.
    cache_arg = "cache" if "cache" in inspect.signature(trunk.forward).parameters else "past_key_values"
    pre = trunk(
        input_ids=input_ids_BT[::G, :L],
        attention_mask=attention_mask_BT[::G, :L],
        position_ids=position_ids_BT[::G, :L],
        use_cache=True,
    )
    cache = getattr(pre, "cache", None)
    if cache is None:
        cache = getattr(pre, "past_key_values", None)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    cache.batch_repeat_interleave(G)
    post = trunk(
        input_ids=input_ids_BT[:, L:],
        attention_mask=attention_mask_BT,
        position_ids=position_ids_BT[:, L:],
        use_cache=True,
        **{cache_arg: cache},
    )
    last_prefix_B1H = pre.last_hidden_state[:, -1:].repeat_interleave(G, 0)
    return torch.cat([last_prefix_B1H, post.last_hidden_state[:, :-1]], dim=1)


def _hidden_through_root(model, trunk, kwargs) -> torch.Tensor:
    """The trunk's last hidden states [B, T, X] from a forward of the FSDP-sharded ROOT.

    Calling the trunk directly would bypass the root's pre-forward all-gather (and its lazy
    init). The root forward computes logits at the last position only (`logits_to_keep=1`);
    a forward hook on the trunk keeps its output. The root keeps its weights (embeddings,
    final norm, LM head) gathered after forward (FSDP2's default for the root) until its
    backward, so the caller's chunked head calls use the full weights and their gradients
    are reduce-scattered with the root's at the end of backward. No shared-prefix path
    here: it would need two root forwards per backward.
    """
    captured = []
    handle = trunk.register_forward_hook(lambda module, args, output: captured.append(output.last_hidden_state))
    try:
        model(**kwargs, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return captured[-1]


@dataclass
class Support:
    """Positions where a loss needs the policy's log-probs of several tokens (a teacher's top-k).

    rows_M, cols_M: long [M]: the row, and the column of the token the position predicts.
    ids_MK: long [M, K]: token ids (padding where mask_MK is False). mask_MK: bool [M, K].
    """

    rows_M: torch.Tensor
    cols_M: torch.Tensor
    ids_MK: torch.Tensor
    mask_MK: torch.Tensor


@dataclass
class SequenceLogprobs:
    """One trunk pass, read several ways.

    selected: {temperature: float [B, T]} log softmax(logits / temperature) of the token at
        each column (0 before `from_col`).
    support_MK: float [M, K] log-probs (temperature 1) of the support ids; log_tail_M: float
        [M], log of the mass outside the support (None without a support).
    """

    selected: dict[float, torch.Tensor]
    support_MK: torch.Tensor | None = None
    log_tail_M: torch.Tensor | None = None


def sequence_logprobs(
    model: torch.nn.Module,
    input_ids_BT: torch.Tensor,
    attention_mask_BT: torch.Tensor,
    *,
    temperatures: tuple[float, ...] = (1.0,),
    support: Support | None = None,
    chunk_rows: int = 4,
    recompute_head: bool = False,
    from_col: int = 1,
    share_prefix: bool = True,
) -> SequenceLogprobs:
    """Selected-token log-probs at each temperature, and support log-probs, from one trunk pass.

    See `selected_logprobs` for the layout, padding, `from_col`, `share_prefix` and
    `recompute_head`. The support's columns must be >= from_col. Raises ValueError for a
    temperature <= 0.
    """
    if any(t <= 0 for t in temperatures):
        raise ValueError("temperature must be > 0 for log-probabilities (greedy has none)")
    position_ids_BT = (attention_mask_BT.long().cumsum(-1) - 1).clamp(min=0)
    trunk, head = _trunk_and_head(model)
    B, T = input_ids_BT.shape
    kwargs = dict(input_ids=input_ids_BT, attention_mask=attention_mask_BT, position_ids=position_ids_BT)
    from_col = max(1, min(from_col, T))
    # states_BSX: the hidden states (or logits, for a model we cannot split) that predict columns from_col .. T-1
    states_BSX = None
    sharded = is_sharded(model)
    if sharded and trunk is not None:
        states_BSX = _hidden_through_root(model, trunk, kwargs)[:, from_col - 1 : -1]
    elif trunk is not None and share_prefix and 1 < from_col < T and not _uses_activation_checkpointing(trunk):
        G = shared_prefix_group(input_ids_BT, attention_mask_BT, from_col)
        if G > 1:
            states_BSX = _hidden_with_shared_prefix(trunk, input_ids_BT, attention_mask_BT, position_ids_BT, from_col, G)
    if states_BSX is None:
        if trunk is None:
            states_BSX = model(**kwargs, use_cache=False).logits[:, from_col - 1 : -1]
        else:
            states_BSX = trunk(**kwargs, use_cache=False).last_hidden_state[:, from_col - 1 : -1]
    is_hidden = trunk is not None

    def chunk_logprobs(inputs_RSX: torch.Tensor, targets_RS: torch.Tensor, temperature: float) -> torch.Tensor:
        logits_RSV = (head(inputs_RSX) if is_hidden else inputs_RSX).float()
        if temperature != 1.0:
            logits_RSV = logits_RSV / temperature
        picked_RS = logits_RSV.gather(-1, targets_RS.unsqueeze(-1)).squeeze(-1)
        return picked_RS - torch.logsumexp(logits_RSV, dim=-1)

    selected = {}
    zeros_BF = torch.zeros(B, from_col, device=input_ids_BT.device)
    for temperature in dict.fromkeys(temperatures):
        rows = []
        for start in range(0, B, chunk_rows):
            sl = slice(start, start + chunk_rows)
            args = (states_BSX[sl], input_ids_BT[sl, from_col:], temperature)
            if recompute_head and is_hidden and torch.is_grad_enabled():
                rows.append(torch.utils.checkpoint.checkpoint(chunk_logprobs, *args, use_reentrant=False))
            else:
                rows.append(chunk_logprobs(*args))
        selected[temperature] = torch.cat([zeros_BF, torch.cat(rows, 0)], dim=1)
    support_MK = log_tail_M = None
    if support is not None:
        support_MK, log_tail_M = _support_logprobs(
            states_BSX, support, from_col, head if is_hidden else None, 64 * chunk_rows
        )
    if sharded and not torch.is_grad_enabled():
        model.reshard()  # no backward will free the root's gathered weights (stale after an optimizer step)
    return SequenceLogprobs(selected, support_MK, log_tail_M)


def _support_logprobs(states_BSX, support: Support, from_col: int, head, chunk_positions: int):
    """Log-probs of the support ids, and of everything outside the support, at each position.

    The head runs only at the M positions, a chunk at a time: no [B, T, V] tensor.
    log_tail_M = log(1 - exp(logsumexp of the support log-probs)) in float32 (about 1e-7
    absolute error; a tail below 1e-30 is clamped).
    """
    source_MX = states_BSX[support.rows_M, support.cols_M - from_col]
    out_lp, out_tail = [], []
    for start in range(0, source_MX.shape[0], chunk_positions):
        sl = slice(start, start + chunk_positions)
        logits_CV = (head(source_MX[sl]) if head is not None else source_MX[sl]).float()
        lp_CK = logits_CV.gather(-1, support.ids_MK[sl]) - torch.logsumexp(logits_CV, dim=-1, keepdim=True)
        out_lp.append(lp_CK)
        inside_C = torch.logsumexp(torch.where(support.mask_MK[sl], lp_CK, float("-inf")), dim=-1)
        out_tail.append(torch.log((-torch.expm1(inside_C)).clamp(min=1e-30)))
    return torch.cat(out_lp, 0), torch.cat(out_tail, 0)


def selected_logprobs(
    model: torch.nn.Module,
    input_ids_BT: torch.Tensor,
    attention_mask_BT: torch.Tensor,
    *,
    chunk_rows: int = 4,
    temperature: float = 1.0,
    recompute_head: bool = False,
    from_col: int = 1,
    share_prefix: bool = True,
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

    share_prefix: when from_col > 1 and the rows come in runs of G with the
    same first from_col columns (G samples of one prompt), each prompt runs
    through the trunk once and the completions attend to its repeated KV
    cache: the same numbers (up to float rounding) with the prompt computed
    P times instead of P*G. Off under activation checkpointing (which drops
    the cache) and for models without a KV cache.
    """
    out = sequence_logprobs(
        model, input_ids_BT, attention_mask_BT, temperatures=(temperature,), chunk_rows=chunk_rows,
        recompute_head=recompute_head, from_col=from_col, share_prefix=share_prefix,
    )
    return out.selected[temperature]
