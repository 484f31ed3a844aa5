"""What the student is trained with: seeding, LoRA, activation checkpointing, precision, AdamW, the LR schedule."""

from __future__ import annotations

import contextlib
import math
import random
from typing import Any

import torch

from opd_sdk.config.settings import OptimizerSettings
from opd_sdk.errors import ConfigError
from opd_sdk.parallel.strategy import ParallelStrategy


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int, total_steps: int):
    """Linear warmup, then constant / linear decay to 0 / cosine decay to 0."""
    if kind not in ("constant", "linear", "cosine"):
        raise ConfigError(f"lr_schedule must be 'constant', 'linear' or 'cosine', got {kind!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def adamw(params: list[torch.nn.Parameter], **kw: Any) -> torch.optim.Optimizer:
    """AdamW, fused where torch supports it (CPU and CUDA): ~10x faster than foreach on CPU."""
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, **kw)


def wrap_lora(model: torch.nn.Module, lora: Any) -> torch.nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("lora= needs peft: pip install 'opd-sdk[peft]'") from None
    config = lora if isinstance(lora, LoraConfig) else LoraConfig(task_type="CAUSAL_LM", **dict(lora))
    return get_peft_model(model, config)


def prepare_student(model: torch.nn.Module, parallel: ParallelStrategy, *, lora: Any = None,
                    gradient_checkpointing: bool = False) -> torch.nn.Module:
    """LoRA adapters (`wrap_lora`), activation checkpointing, then the strategy's device and sharding:
    before the optimizer and the rollout engine see the parameters."""
    if lora is not None:
        model = wrap_lora(model, lora)
    if gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return parallel.prepare_model(model)


def autocast_dtype(precision: str, device: torch.device) -> tuple[str, torch.dtype | None]:
    """("fp32" | "bf16", the autocast dtype or None) for "fp32", "bf16" or "auto" (bf16 on GPU, fp32 on CPU)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return precision, torch.bfloat16 if precision == "bf16" else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast on `device` to `dtype`; a context that does nothing for None (fp32)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def make_optimizer(model: torch.nn.Module, opt: OptimizerSettings, total_steps: int):
    """(trainable parameters, AdamW over them, its LR schedule). Raises ConfigError for a model
    with no trainable parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters")
    optimizer = adamw(params, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)
    return params, optimizer, make_scheduler(optimizer, opt.schedule, opt.warmup_steps, total_steps)
