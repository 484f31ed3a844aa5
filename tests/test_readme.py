"""README.md as a new user runs it: every fenced Python block executes (the scripted server in place of the
remote API, a tiny local model in place of SmolLM2, 2 short steps), and every YAML block passes the checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

import opd_sdk
import opd_sdk.train.metrics
from opd_sdk.config.registry import check_config
from opd_sdk.config.run import validate_config
from tests.loop_fixtures import tiny_model, tiny_tokenizer
from tests.scripted_server import ScriptedServer

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
PYTHON = re.findall(r"```python\n(.*?)```", README, re.S)
YAML = re.findall(r"```yaml\n(.*?)```", README, re.S)


def test_the_readme_has_the_blocks_this_file_runs():
    assert len(PYTHON) == 2 and len(YAML) == 3


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    path = tmp_path / "tiny"
    tok = tiny_tokenizer()
    tiny_model(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_quickstart_collects_feedback_from_an_openai_compatible_endpoint(tmp_path, monkeypatch, capsys):
    with ScriptedServer(lambda body: '{"score": 7}') as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
        monkeypatch.chdir(tmp_path)
        exec(compile(PYTHON[0], "README.md:python-1", "exec"), {})
        assert srv.count == 1
    out = capsys.readouterr().out
    assert "scores=[0.7]" in out and "requests_sent=1" in out


def test_train_in_code_runs_and_writes_what_its_comment_promises(tmp_path, tiny_dir, monkeypatch):
    import opd_sdk.models
    import opd_sdk.train.trainer

    class ShortTrainer(opd_sdk.train.trainer.Trainer):  # the README's code, 2 steps of 4 tokens on the tiny model
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "max_steps": 2, "max_new_tokens": 4})

    monkeypatch.setattr(opd_sdk.models, "resolve_model_path", lambda name: str(tiny_dir))
    monkeypatch.setattr(opd_sdk, "Trainer", ShortTrainer)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(PYTHON[1], "README.md:python-2", "exec"), scope)
    run = tmp_path / "runs" / "in_code"
    assert (run / "metrics.jsonl").exists() and (run / "final" / "config.json").exists()
    assert (run / "step-2" / "trainer_state.json").exists()  # "step-N/ (also written on Ctrl-C)"
    # the resume line on the finished run: loads step-2/, and says nothing is left to train (issue 24.10)
    with pytest.raises(opd_sdk.ConfigError, match=r"is finished \(final/ saved\): step 2 of steps 2"):
        scope["trainer"].train(resume_from="latest")
    assert scope["trainer"].step == 2 and [r["step"] for r in opd_sdk.train.metrics.read_metrics(run / "metrics.jsonl")] == [1, 2]


@pytest.mark.parametrize("index", range(len(YAML)))
def test_yaml_blocks_pass_the_checks(index, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # both blocks use local servers: no key needed
    raw = yaml.safe_load(YAML[index])
    base = {"student": {"model": "smollm2"}, "data": {"task": "times_table"}}
    if "objective" not in raw:  # a section on its own (the vLLM rollout block): in the smallest whole config
        base |= {"teacher": {"type": "verifier"}, "objective": {"type": "reward_weighted"}}
    check_config(validate_config({**base, **raw}))
