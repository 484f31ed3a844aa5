"""Greedy accuracy of a model on prompts with a checker: the before/after number of a run."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from opd_sdk.data import PromptItem
from opd_sdk.errors import ConfigError
from opd_sdk.rollout.engine import TransformersRollout

Checker = Callable[[str, PromptItem], bool]
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def last_number_matches(text: str, item: PromptItem) -> bool:
    """True when the last number in `text` equals `item.answer` as a number."""
    if item.answer is None:
        raise ConfigError("last_number_matches needs PromptItem.answer; give each eval prompt an answer")
    found = _NUMBER.findall(text.replace(",", ""))
    if not found:
        return False
    try:
        return float(found[-1]) == float(item.answer)
    except ValueError:
        return found[-1] == item.answer.strip()


@dataclass
class EvalResult:
    accuracy: float
    correct: int
    total: int
    completions: list[str]


def greedy_accuracy(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[PromptItem],
    checker: Checker = last_number_matches,
    *,
    max_new_tokens: int = 32,
    batch_size: int = 64,
    autocast_dtype: torch.dtype | None = None,
) -> EvalResult:
    """Greedy-decode every prompt once and count how many the checker accepts."""
    if not prompts:
        raise ConfigError("greedy_accuracy got no prompts")
    engine = TransformersRollout(
        model, tokenizer, temperature=0.0, max_new_tokens=max_new_tokens, autocast_dtype=autocast_dtype
    )
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = engine.sample(prompts[start : start + batch_size], 1)
        texts.extend(c.text for c in batch.completions)
    correct = sum(bool(checker(t, p)) for t, p in zip(texts, prompts, strict=True))
    return EvalResult(accuracy=correct / len(prompts), correct=correct, total=len(prompts), completions=texts)
