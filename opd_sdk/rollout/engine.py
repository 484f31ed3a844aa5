"""Rollout engines: the student samples its own completions.

`RolloutEngine` is the protocol the trainer talks to; `TransformersRollout`
samples with Hugging Face `generate` (one call for the whole batch, KV cache
on, no grad, eval mode). `VLLMRollout` (opd_sdk.rollout.vllm_colocated) holds its own
copy of the weights and refreshes it in `sync_weights`;
`opd_sdk.rollout.build.build_rollout_engine` picks one from the settings.

Sampler log-probs: log softmax(logits / temperature) at the sampled token,
from the raw logits `generate` saw. Top-p / top-k truncation is *not* folded
in, so these numbers are exactly what `selected_logprobs(model, ...,
temperature=T)` recomputes for the same weights: the importance ratio of an
on-policy step is 1 (up to float noise).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Protocol, runtime_checkable

import torch
from transformers import GenerationConfig

from opd_sdk.data import PromptItem
from opd_sdk.errors import ConfigError
from opd_sdk.rollout.batch import RolloutBatch
from opd_sdk.types import Completion

log = logging.getLogger(__name__)


@runtime_checkable
class RolloutEngine(Protocol):
    """exact_logprobs: True when the batch's sampler log-probs are the trainer's own
    (same weights, same kernels: the importance ratio is 1), False for another engine."""

    exact_logprobs: bool

    def sample(self, prompts: list[PromptItem], group_size: int) -> RolloutBatch: ...

    def close(self) -> None:
        """Free what the engine holds (a vLLM engine, temporary folders)."""

    def sync_weights(self, model: torch.nn.Module) -> None: ...


def eos_token_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    """Every id that ends a completion: the generation config's EOS ids and the tokenizer's."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        if value is None:
            continue
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i not in ids:
                ids.append(int(i))
    if not ids:
        raise ConfigError("the tokenizer has no eos_token and the model's generation_config names none; set one")
    return ids


def render_prompts(tokenizer, prompts: list[PromptItem], *, use_chat_template: bool = True) -> list[str]:
    """Prompt strings as the student sees them: chat template with the generation prompt appended."""
    if not use_chat_template:
        return [p.prompt if isinstance(p.prompt, str) else "\n\n".join(m.content for m in p.prompt) for p in prompts]
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(
            "the tokenizer has no chat template; use an instruct model's tokenizer, set "
            "tokenizer.chat_template, or pass use_chat_template=False to feed raw prompt text"
        )
    return [
        tokenizer.apply_chat_template(
            [m.model_dump() for m in p.messages()], add_generation_prompt=True, tokenize=False
        )
        for p in prompts
    ]


class TransformersRollout:
    """Batched sampling of `group_size` completions per prompt with `generate`.

    temperature 0 means greedy (then the sampler log-probs are at temperature 1).
    top_k 0 and top_p 1.0 switch those filters off. autocast_dtype (e.g.
    torch.bfloat16) runs generation under autocast; the trainer passes its
    precision here.
    """

    exact_logprobs = True

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        max_new_tokens: int = 128,
        use_chat_template: bool = True,
        autocast_dtype: torch.dtype | None = None,
        synced: bool = False,
    ) -> None:
        if temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model = model
        self.tokenizer = tokenizer
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.max_new_tokens = max_new_tokens
        self.use_chat_template = use_chat_template
        self.autocast_dtype = autocast_dtype
        self.synced = synced  # FSDP: every rank runs the same number of decoding steps (collectives line up)
        self.eos_ids = eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_ids[0]

    def close(self) -> None:
        """Nothing to free: the engine is the trainer's own model."""

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Shares the trainer's model, so nothing to copy; a foreign model's weights are loaded."""
        if model is not self.model:
            self.model.load_state_dict(model.state_dict())

    def _generation_config(self) -> GenerationConfig:
        greedy = self.temperature == 0
        return GenerationConfig(
            do_sample=not greedy,
            temperature=None if greedy else self.temperature,
            # 0 and 1.0 when sampling, not None: transformers fills a None top_k with its default of 50
            top_p=None if greedy else self.top_p,
            top_k=None if greedy else max(self.top_k, 0),
            max_new_tokens=self.max_new_tokens,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            use_cache=True,
            output_logits=True,
            return_dict_in_generate=True,
        )

    def sample(self, prompts: list[PromptItem], group_size: int) -> RolloutBatch:
        if group_size < 1:
            raise ConfigError(f"group_size must be >= 1, got {group_size}")
        if not prompts:
            raise ConfigError("sample() got no prompts")
        device = next(self.model.parameters()).device
        texts = render_prompts(self.tokenizer, prompts, use_chat_template=self.use_chat_template)
        enc = self.tokenizer(
            texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
        )
        prompt_ids_BP = enc["input_ids"].repeat_interleave(group_size, 0).to(device)
        prompt_mask_BP = enc["attention_mask"].repeat_interleave(group_size, 0).to(device)
        prompt_len = prompt_ids_BP.shape[1]

        was_training = self.model.training
        self.model.eval()
        autocast = (
            torch.autocast(device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        try:
            with torch.no_grad(), autocast:
                out = self.model.generate(
                    input_ids=prompt_ids_BP,
                    attention_mask=prompt_mask_BP,
                    generation_config=self._generation_config(),
                    synced_gpus=self.synced,
                )
        finally:
            self.model.train(was_training)

        sequences_BT = out.sequences
        gen_BN = sequences_BT[:, prompt_len:]
        N = gen_BN.shape[1]
        # Log-prob of each sampled token under the (temperature-scaled) raw logits.
        scale = self.temperature if self.temperature > 0 else 1.0
        logprobs_BN = torch.zeros(gen_BN.shape, dtype=torch.float32, device=device)
        for t, logits_BV in enumerate(out.logits[:N]):
            logp_BV = torch.log_softmax(logits_BV.float() / scale, dim=-1)
            logprobs_BN[:, t] = logp_BV.gather(-1, gen_BN[:, t : t + 1]).squeeze(-1)
        # A completion is every token up to and including its first EOS.
        is_eos_BN = torch.isin(gen_BN, torch.tensor(self.eos_ids, device=device))
        ended_before_BN = (is_eos_BN.long().cumsum(-1) - is_eos_BN.long()) > 0
        keep_BN = ~ended_before_BN
        completion_mask_BT = torch.cat(
            [torch.zeros_like(prompt_mask_BP, dtype=torch.float32), keep_BN.float()], dim=1
        )
        attention_mask_BT = torch.cat([prompt_mask_BP, keep_BN.long()], dim=1)
        sampler_logprobs_BT = torch.cat(
            [torch.zeros(prompt_mask_BP.shape, device=device), logprobs_BN * keep_BN], dim=1
        )
        input_ids_BT = torch.where(attention_mask_BT.bool(), sequences_BT, torch.full_like(sequences_BT, self.pad_id))

        completions = []
        for b in range(gen_BN.shape[0]):
            ids = gen_BN[b][keep_BN[b]].tolist()
            text_ids = [i for i in ids if i not in self.eos_ids]
            completions.append(Completion(text=self.tokenizer.decode(text_ids, skip_special_tokens=True), token_ids=ids))
        return RolloutBatch(
            prompts=list(prompts),
            group_size=group_size,
            input_ids_BT=input_ids_BT,
            attention_mask_BT=attention_mask_BT,
            completion_mask_BT=completion_mask_BT,
            sampler_logprobs_BT=sampler_logprobs_BT,
            prompt_len=prompt_len,
            completions=completions,
            temperature=scale,
        )
