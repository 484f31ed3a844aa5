"""Shared pieces of the vLLM rollout tests: a tiny Llama vLLM can run on CPU
(head_dim 64), a fixed text, the trainer's log-probs of it, and one real
optimizer step."""

from __future__ import annotations

import pytest
import torch

from opd_sdk.rollout.logprobs import selected_logprobs
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


def start_vllm_server(model_dir: str, port: int, log_path: str, *, extra_args: list[str] = (), wait_s: float = 600):
    """A real vLLM OpenAI-compatible server (this python's vllm) on 127.0.0.1:port, with runtime LoRA
    loading and the dev routes (/collective_rpc, /reset_prefix_cache) on. Returns (process, base_url);
    the caller terminates the process."""
    import os
    import subprocess
    import sys
    import time

    import httpx

    env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="1", VLLM_SERVER_DEV_MODE="1",
               VLLM_CPU_KVCACHE_SPACE="1")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
           "--served-model-name", "student", "--dtype", "float32", "--max-model-len", "256", "--enforce-eager",
           "--host", "127.0.0.1", "--port", str(port), "--logprobs-mode", "processed_logprobs",
           "--enable-lora", "--max-lora-rank", "8", *extra_args]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM server exited ({proc.returncode}); log: {open(log_path).read()[-3000:]}")
        try:
            if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(2)
    proc.terminate()
    raise RuntimeError(f"vLLM server did not answer in {wait_s} s; log: {open(log_path).read()[-3000:]}")
