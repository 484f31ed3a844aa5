"""What the student is trained with: seeding, AdamW, the LR schedule, LoRA wrapping."""

from __future__ import annotations

import math
import random
from typing import Any

import torch

from opd_sdk.errors import ConfigError


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
