"""Shared pieces of the vLLM rollout tests: a tiny Llama vLLM can run on CPU
(head_dim 64), a fixed text, the trainer's log-probs of it, and one real
optimizer step."""

from __future__ import annotations

import pytest
import torch

from opd_sdk.logprobs import selected_logprobs
from tests.loop_fixtures import tiny_model

FIXED_TEXT = "What is 3 times 4? The answer is 12."


def vllm_imports() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


requires_vllm = pytest.mark.skipif(not vllm_imports(), reason="vllm does not import here (run in the vLLM venv)")


def student(tok, seed: int = 0):
    """2 layers, hidden 256, 4 heads (head_dim 64: a size vLLM's CPU attention supports)."""
    return tiny_model(tok, seed=seed, hidden=256)


def fixed_ids(tok) -> list[int]:
    return tok(FIXED_TEXT, add_special_tokens=False)["input_ids"]


def trainer_logprobs(model, ids: list[int]) -> torch.Tensor:
    """float [L]: the trainer's log p(ids[t] | ids[:t]) at temperature 1 (0 at t = 0)."""
    seq = torch.tensor([ids])
    with torch.no_grad():
        return selected_logprobs(model, seq, torch.ones_like(seq))[0].float()


def optimizer_step(model, ids: list[int], lr: float = 1e-2) -> None:
    """One AdamW step raising the log-prob of `ids` (a real update of every trainable weight it touches)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    seq = torch.tensor([ids])
    loss = -selected_logprobs(model, seq, torch.ones_like(seq)).sum()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
