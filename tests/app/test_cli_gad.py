"""`opd train` with `type: gad`: the example config, shrunk, against the scripted server as the API teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from opd_sdk.app import cli
from opd_sdk.config.run import load_config
from opd_sdk.config.registry import check_config
from opd_sdk.errors import ConfigError
from tests.loop_fixtures import one_thread, tiny_model, tiny_tokenizer  # noqa: F401
from tests.scripted_server import ScriptedServer

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "configs" / "gad_text_teacher.yaml"



def tiny_overrides(tiny_dir: Path, out: Path, base_url: str) -> list[str]:
    sets = [f"student.model={tiny_dir}", f"teacher.teacher.base_url={base_url}", "teacher.teacher.api_key_env=null",
            "teacher.teacher.max_tokens=8", "teacher.max_tokens=8", "teacher.warmup_steps=1", "teacher.warmup_updates=2",
            "teacher.lr=1e-3", "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=4",
            "eval.max_new_tokens=4", "data.eval_size=4", "data.task_params.n_train=12", "steps=2", "save_every=1",
            "collector.budget_usd=null", f"output_dir={out}", "logging.progress=false"]
    return [arg for s in sets for arg in ("--set", s)]


def test_opd_train_with_a_gad_teacher_logs_its_metrics_checkpoints_it_and_resumes(tmp_path, tiny_dir, capsys,
                                                                                  one_thread):  # noqa: F811
    torch.manual_seed(0)
    with ScriptedServer(lambda body: "The answer is 4.") as server:
        sets = tiny_overrides(tiny_dir, tmp_path / "run", server.base_url)
        rc = cli.main(["train", str(EXAMPLE), *sets])
        out = capsys.readouterr()
        assert rc == 0, out.err
        rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if r["step"] > 0]
        assert [r["step"] for r in steps] == [1, 2]
        assert all(0.0 <= r["gad/accuracy"] <= 1.0 and r["gad/loss"] > 0 and "gad/margin" in r
                   and r["rollout/completion_len_mean"] > 0 and r["teacher/failures"] == 0 for r in steps)
        assert [r["gad/warmup"] for r in steps] == [1, 0]
        asked = server.count_path("/v1/chat/completions")
        prompts = [json.dumps(b["messages"]) for b in server.bodies("/v1/chat/completions")]
        assert len(set(prompts)) == asked  # each prompt asked once
        assert asked in (4, 5)  # 2 steps x 2 prompts, and the check before training asks the first training prompt
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert summary["teacher_requests"] == 4 + asked  # the discriminator's requests + the reference's calls
        assert (tmp_path / "run" / "step-2" / "teachers.pt").exists()

        rc = cli.main(["train", str(EXAMPLE), *sets, "--set", "steps=3", "--resume"])
        out = capsys.readouterr()
        assert rc == 0, out.err
        assert "resuming from step 2" in out.out
        prompts = [json.dumps(b["messages"]) for b in server.bodies("/v1/chat/completions")]
        assert len(set(prompts)) == len(prompts)  # still once per prompt: the resumed run asked only new ones


def test_gad_refuses_overlap_and_teacher_score_eval_in_the_config_checks(monkeypatch, tiny_dir):
    """(tests/config/test_config.py checks that the example itself passes.)"""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    with pytest.raises(ConfigError) as exc:
        check_config(load_config(EXAMPLE, [f"student.model={tiny_dir}", "rollout.max_staleness=1",
                                           "eval.metric=teacher_score"]))
    assert "rollout.max_staleness: teacher (gad) learns from every batch" in str(exc.value)
    assert "eval.metric: teacher_score would ask teacher (gad)" in str(exc.value)


def test_a_gad_section_without_a_text_teacher_is_refused_by_the_config(tmp_path):
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["teacher"]["teacher"] = {"type": "judge", "model": "m", "base_url": "http://127.0.0.1:9/v1"}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="GAD needs the teacher's text, from a `reference` teacher"):
        load_config(path)
