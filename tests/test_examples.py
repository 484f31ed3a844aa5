"""Every example runs, in a tiny configuration: a tiny random model, the scripted OpenAI-compatible
server for the API examples (or the real vLLM server when OPD_VLLM_URL is set: the real_server tier)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from opd_sdk.types import feedback_from_json
from tests.loop_fixtures import tiny_tokenizer
from tests.scripted_server import ScriptedServer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = ["--steps", "2", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4"]


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module



@pytest.fixture(autouse=True)
def _seed(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setenv("OPD_TEST_KEY", "sk-test-not-a-real-key")


class EchoLogprobs:
    """/v1/completions with echo over token ids (vLLM's answer shape): a fixed log-prob per token id."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    @staticmethod
    def lp(token_id: int) -> float:
        return -0.5 - (token_id % 7) / 10

    def __call__(self, body: dict) -> dict:
        ids = list(body["prompt"])
        tokens = self.tok.convert_ids_to_tokens(ids)
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        lps = [None] + [self.lp(i) for i in ids[1:]]
        prompt_lps = [None] + [{str(i): {"logprob": self.lp(i), "rank": 1, "decoded_token": t}}
                               for i, t in zip(ids[1:], tokens[1:])]
        return {
            "id": "cmpl", "object": "text_completion", "created": 0, "model": "teacher",
            "choices": [{"index": 0, "text": "".join(tokens) + ".", "finish_reason": "length",
                         "logprobs": {"tokens": tokens + ["."], "text_offset": offsets + [pos],
                                      "token_logprobs": lps + [-1.0], "top_logprobs": None},
                         "prompt_logprobs": prompt_lps}],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1},
        }


def test_distil_from_judge(tmp_path, tiny_dir):
    with ScriptedServer(lambda body: '{"score": 8}') as srv:
        argv = ["--base-url", srv.base_url, "--teacher-model", "judge", "--api-key-env", "OPD_TEST_KEY",
                "--student", str(tiny_dir), "--out", str(tmp_path / "judge")] + TINY
        result = load_example("distil_from_judge").main(argv)
        assert srv.count == result["usage"].requests_sent > 0
        assert all(h["reward/mean"] == pytest.approx(0.8) for h in result["history"])
        # the same command again: every judge call comes from the cache
        sent = srv.count
        again = load_example("distil_from_judge").main(argv)
        assert srv.count == sent and again["usage"].requests_sent == 0 and again["usage"].cache_hits > 0
    assert (tmp_path / "judge" / "final" / "config.json").exists()


def test_spin_from_api_teacher_and_self_play(tmp_path, tiny_dir):
    with ScriptedServer(lambda body: "3 times 4 is 12.") as srv:
        argv = ["--base-url", srv.base_url, "--teacher-model", "teacher", "--api-key-env", "OPD_TEST_KEY",
                "--student", str(tiny_dir), "--task", "times_table", "--out", str(tmp_path / "spin")] + TINY
        result = load_example("spin_from_api_teacher").main(argv)
    assert srv.count == result["usage"].requests_sent == 4  # one reference per prompt, 2 steps x 2 prompts
    assert all(h["teacher/failures"] == 0 for h in result["history"])
    free = load_example("spin_from_api_teacher").main(
        ["--no-teacher", "--student", str(tiny_dir), "--task", "times_table", "--out", str(tmp_path / "sp2")] + TINY
    )
    assert len(free["history"]) == 2 and free["usage"] is None


def test_token_opd_from_logprob_endpoint(tmp_path, tiny_dir):
    tok = tiny_tokenizer()
    with ScriptedServer(EchoLogprobs(tok)) as srv:
        result = load_example("token_opd_vllm").main(
            ["--base-url", srv.base_url, "--teacher-model", "teacher", "--api-key-env", "OPD_TEST_KEY",
             "--student", str(tiny_dir), "--task", "times_table", "--out", str(tmp_path / "tok")] + TINY
        )
    assert result["self_test"]["stable"] and result["self_test"]["max_abs_diff"] == 0.0
    assert all(h["teacher/failures"] == 0 for h in result["history"])
    assert result["usage"].requests_sent > 0


def test_self_distill(tmp_path, tiny_dir):
    result = load_example("self_distill").main(
        ["--student", str(tiny_dir), "--n-eval", "4", "--mode", "ema", "--out", str(tmp_path / "sd")] + TINY
    )
    # a random model's samples may not survive the chat-template view check (the teacher refuses those
    # groups as TokenizationMismatch failures, masked out); at least one group must have been scored
    assert len(result["history"]) == 2
    assert sum(h["teacher/failures"] for h in result["history"]) < 4
    assert 0.0 <= result["after"] <= 1.0
    assert (tmp_path / "sd" / "final" / "config.json").exists()


def test_collect_feedback_is_resumable(tmp_path):
    rows = [{"prompt": f"What is {a} plus 2?", "completions": [str(a + 2), "no idea"], "answer": a + 2}
            for a in range(5)]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with ScriptedServer(lambda body: '{"score": 6}') as srv:
        common = ["--teacher", "judge", "--base-url", srv.base_url, "--teacher-model", "judge", "--api-key-env", "OPD_TEST_KEY"]
        # first run stops after 3 lines (simulated crash), the rerun does the rest
        src.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
        first = load_example("collect_feedback").main([str(src), str(out)] + common)
        sent = srv.count
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
        second = load_example("collect_feedback").main([str(src), str(out)] + common)
    assert first["collected"] == 3 and second["collected"] == 2 and second["skipped"] == 3
    assert srv.count - sent == second["usage"].requests_sent > 0  # nothing asked twice
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["index"] for r in lines) == list(range(5))
    assert all(feedback_from_json(json.dumps(r["feedback"])).scores == [0.6, 0.6] for r in lines)

    verified = tmp_path / "verified.jsonl"
    load_example("collect_feedback").main([str(src), str(verified), "--teacher", "verifier"])
    scores = [json.loads(line)["feedback"]["scores"] for line in verified.read_text().splitlines()]
    assert scores == [[1.0, 0.0]] * 5


def test_trl_grpo_with_opd_reward(tmp_path, tiny_dir):
    pytest.importorskip("trl", reason="pip install 'opd-sdk[trl]'")
    result = load_example("trl_grpo_rewards").main(
        ["--teacher", "verifier", "--student", str(tiny_dir), "--steps", "1", "--prompts-per-step", "2",
         "--group-size", "2", "--max-new-tokens", "4", "--out", str(tmp_path / "grpo")]
    )
    assert len(result["rewards"]) == 1 and 0.0 <= result["rewards"][0] <= 1.0
    assert result["usage"].failures == 0 and result["usage"].requests_sent + result["usage"].cache_hits == 4


# One set of flag names across the examples: a flag an example adds must be one of these.
FLAGS = {
    "--teacher": "teacher type", "--teacher-model": "the served teacher model name", "--no-teacher": "",
    "--base-url": "", "--api-key-env": "", "--rubric": "", "--rpm": "", "--tpm": "", "--concurrency": "",
    "--budget-usd": "", "--cache": "", "--student": "HF id, folder or smollm2", "--task": "", "--n-prompts": "",
    "--n-eval": "", "--steps": "", "--prompts-per-step": "", "--group-size": "", "--max-new-tokens": "",
    "--teacher-max-tokens": "", "--lr": "", "--beta": "", "--refresh-every": "", "--mode": "", "--send": "",
    "--top-k": "", "--divergence": "", "--out": "", "--chunk": "", "--retry-failures": "", "--help": "",
}
SCRIPTS = sorted(p.stem for p in EXAMPLES.glob("*.py"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_runs_and_uses_the_shared_flag_names(name):
    import re
    import subprocess
    import sys

    root = EXAMPLES.parent
    proc = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), "--help"], cwd=root, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(root)))
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", proc.stdout.split("options:")[-1]))
    assert flags and flags <= set(FLAGS), sorted(flags - set(FLAGS))


@pytest.mark.real_server
def test_examples_against_the_real_vllm_server(tmp_path):
    url = os.environ.get("OPD_VLLM_URL")
    if not url:
        pytest.skip("set OPD_VLLM_URL to a vLLM server serving SmolLM2-135M-Instruct as 'smollm2'")
    base = url.rstrip("/") + ("" if url.rstrip("/").endswith("/v1") else "/v1")
    tiny = ["--steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "8"]
    judged = load_example("distil_from_judge").main(
        ["--base-url", base, "--teacher-model", "smollm2", "--out", str(tmp_path / "j")] + tiny
    )
    assert judged["usage"].requests_sent > 0 and judged["history"][0]["reward/mean"] is not None
    token = load_example("token_opd_vllm").main(
        ["--base-url", base, "--teacher-model", "smollm2", "--task", "times_table", "--out", str(tmp_path / "t")] + tiny
    )
    assert token["self_test"]["n_tokens"] > 0
    assert token["history"][0]["teacher/failures"] == 0
