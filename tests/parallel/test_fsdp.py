"""FSDP2 on CPU: tests/fsdp_script.py under torchrun with 2 gloo processes, and with 1.

The script checks, for a plain tiny Llama (tied embeddings) and a LoRA-wrapped one, that the
sharded run equals the single-process run over the whole batch: summed gradients through
`sequence_logprobs`, the global grad norm and clipping, AdamW steps, the full state dict
(and `save_pretrained` with it), and the sharded model + optimizer checkpoint.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _fsdp_unavailable() -> str | None:
    try:
        import torch.distributed as dist
    except ImportError as exc:
        return f"torch.distributed unavailable: {exc}"
    if not dist.is_available():
        return "torch built without distributed support"
    if not dist.is_gloo_available():
        return "gloo backend unavailable"
    try:
        import torch.distributed.checkpoint  # noqa: F401
        from torch.distributed.fsdp import FSDPModule, fully_shard  # noqa: F401
    except ImportError as exc:
        return f"FSDP2 fully_shard unavailable: {exc}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world_size", [2, 1])
def test_fsdp_matches_single_process(world_size, tmp_path):
    reason = _fsdp_unavailable()
    if reason:
        pytest.skip(reason)
    pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=pythonpath)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world_size}",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        str(ROOT / "tests" / "fsdp_script.py"), str(tmp_path),
    ]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun timed out after 180 s:\n{exc.stdout}\n{exc.stderr}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    for rank in range(world_size):
        assert f"FSDP_OK rank={rank}" in proc.stdout, out[-6000:]
        assert f"lora ok rank={rank}" in proc.stdout
