"""Helpers for objective tests: a tiny random Llama and a hand-built RolloutBatch."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from opd_sdk.data import PromptItem
from opd_sdk.rollout.batch import RolloutBatch
from opd_sdk.rollout.logprobs import selected_logprobs
from opd_sdk.types import Completion

VOCAB = 48
PAD = 0
EOS = 1


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.float()
    return model


def build_batch(
    model: torch.nn.Module,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    group_size: int,
    answers: list[str | None] | None = None,
) -> RolloutBatch:
    """Rows prompt-major: [left-padded prompt | completion, right-padded]; sampler log-probs from `model`."""
    P = len(prompt_ids)
    assert len(completion_ids) == P * group_size
    prompt_len = max(len(p) for p in prompt_ids)
    comp_len = max(len(c) for c in completion_ids)
    B, T = P * group_size, prompt_len + comp_len
    input_ids = torch.full((B, T), PAD, dtype=torch.long)
    attention = torch.zeros(B, T, dtype=torch.long)
    comp_mask = torch.zeros(B, T)
    for b, comp in enumerate(completion_ids):
        prompt = prompt_ids[b // group_size]
        input_ids[b, prompt_len - len(prompt) : prompt_len] = torch.tensor(prompt)
        attention[b, prompt_len - len(prompt) : prompt_len] = 1
        input_ids[b, prompt_len : prompt_len + len(comp)] = torch.tensor(comp)
        attention[b, prompt_len : prompt_len + len(comp)] = 1
        comp_mask[b, prompt_len : prompt_len + len(comp)] = 1.0
    with torch.no_grad():
        sampler = selected_logprobs(model, input_ids, attention) * comp_mask
    answers = answers or [None] * P
    prompts = [PromptItem(prompt=f"prompt {p}", answer=answers[p]) for p in range(P)]
    completions = [Completion(text=" ".join(map(str, c)), token_ids=c) for c in completion_ids]
    return RolloutBatch(
        prompts=prompts,
        group_size=group_size,
        input_ids_BT=input_ids,
        attention_mask_BT=attention,
        completion_mask_BT=comp_mask,
        sampler_logprobs_BT=sampler,
        prompt_len=prompt_len,
        completions=completions,
    )


def seq_logprobs(model, batch: RolloutBatch) -> torch.Tensor:
    """Sum of completion-token log-probs per row -> [B] (no grad)."""
    with torch.no_grad():
        lp = selected_logprobs(model, batch.input_ids_BT, batch.attention_mask_BT)
    return (lp * batch.completion_mask_BT).sum(-1)


WORDS = ["<pad>", "</s>", "<s>", "<unk>"] + [str(i) for i in range(10)] + ["the", "answer", "is", "+", "=", "what"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over WORDS (ids 0..19, all < VOCAB); '</s>' is EOS = 1."""
    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>"
    )
