"""`opd inspect` against the real vLLM teacher (real-server tier): SmolLM2-135M-Instruct samples, the
same model served by vLLM answers as a judge and as a log-prob teacher.

Start a server with `.ci/start_vllm.sh` and set OPD_VLLM_URL (OPD_VLLM_MODEL: its served name, default
"smollm2"); skipped without OPD_VLLM_URL.
"""

from __future__ import annotations

import os

import pytest
import yaml

from opd_sdk.app.inspect import run_inspect
from opd_sdk.config.registry import load_and_check

URL = os.environ.get("OPD_VLLM_URL")
MODEL = os.environ.get("OPD_VLLM_MODEL", "smollm2")
pytestmark = [pytest.mark.real_server, pytest.mark.skipif(not URL, reason="set OPD_VLLM_URL to a vLLM server"),
              pytest.mark.timeout(600)]


def test_inspect_reports_a_real_judge_and_finds_no_signal_when_the_teacher_is_the_student(tmp_path):
    raw = {
        "student": {"model": "smollm2"},
        "data": {"task": "addition", "eval_size": 8},
        "teachers": [{"type": "judge", "model": MODEL, "base_url": URL},
                     {"type": "logprob", "model": MODEL, "base_url": URL, "send": "token_ids"}],
        "objective": {"type": "hybrid", "params": {"terms": [
            {"type": "reward_weighted", "weight": 1.0, "source": 0}, {"type": "token_distill", "weight": 1.0, "source": 1}]}},
        "rollout": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 8},
        "output_dir": str(tmp_path / "run"),
        "steps": 5,
        "logging": {"progress": False},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg, checked = load_and_check(str(path))
    reports = run_inspect(cfg, checked, prompts=2, yes=True, out_dir=tmp_path / "report", log=lambda s: None)
    judge, logprob = reports
    assert judge.samples == logprob.samples == 4
    assert set(judge.failures) <= {"bad_response", "truncated"}, judge.failures  # a weak judge may fail to parse
    assert judge.latency(50) > 0 and judge.tokens_per_1k > 0
    # the log-prob teacher is the student's own weights: every token scored, the same ids, stable numbers,
    # and (within float32 noise between vLLM and transformers) no distillation signal at all
    assert logprob.usable == 4 and logprob.logprob["alignment"] == {"token_ids": 4}
    assert logprob.logprob["echo"] == "yes" and logprob.logprob["prompt_logprobs_top_k"] == "yes"
    assert logprob.repeat_max_diff <= 1e-3 and logprob.logprob_signal < 1e-2
    assert (tmp_path / "report" / "inspect.md").exists() and (tmp_path / "report" / "latency.png").exists()
