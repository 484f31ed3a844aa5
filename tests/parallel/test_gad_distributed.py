"""GAD under a 2-process launch: the discriminator lives, learns and is checkpointed on rank 0 alone
(rank 0 asks every teacher for all ranks and sends the scores), and the job resumes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.app.test_cli_gad import EXAMPLE, tiny_overrides
from tests.loop_fixtures import tiny_model, tiny_tokenizer
from tests.scripted_server import ScriptedServer

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available()
    or shutil.which("accelerate") is None,
    reason="needs torch.distributed with gloo and the accelerate launcher",
)


def launch(*args: str) -> subprocess.CompletedProcess:
    cmd = ["accelerate", "launch", "--config_file", str(ROOT / "examples" / "accelerate" / "ddp.yaml"),
           "-m", "opd_sdk", "train", str(EXAMPLE), *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)


def test_gad_on_two_processes_runs_on_rank_0_checkpoints_and_resumes(tmp_path):
    tiny = tmp_path / "tiny"
    tok = tiny_tokenizer()
    tiny_model(tok).save_pretrained(tiny)
    tok.save_pretrained(tiny)
    run = tmp_path / "run"
    with ScriptedServer(lambda body: "The answer is 4.") as server:
        sets = tiny_overrides(tiny, run, server.base_url)
        done = launch(*sets)
        assert done.returncode == 0, done.stderr[-6000:]
        assert "on 2 processes" in done.stdout
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [0, 1, 2]  # rank 0 alone logs
        assert all("gad/accuracy" in r and r["teacher/failures"] == 0 for r in rows[1:])
        assert (run / "step-2" / "teachers.pt").exists() and (run / "step-2" / "rng-rank1.pt").exists()
        prompts = [json.dumps(b["messages"]) for b in server.bodies("/v1/chat/completions")]
        assert len(set(prompts)) == len(prompts)  # each prompt asked once, by rank 0

        done = launch(*sets, "--set", "steps=3", "--resume")
        assert done.returncode == 0, done.stderr[-6000:]
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [0, 1, 2, 3] and "gad/accuracy" in rows[3]
        prompts = [json.dumps(b["messages"]) for b in server.bodies("/v1/chat/completions")]
        assert len(set(prompts)) == len(prompts)
