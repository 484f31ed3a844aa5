"""`opd train --check` (and `opd train` before it loads anything): every check that needs no weights,
all problems at once, each named by its YAML path with a fix. Cases from issue 15, each run as a command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.app.test_cli import no_model_load, run_cli, write_config  # noqa: F401


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("command", [["--check"], []])
@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"collector": {"budget_usd": 5.0}}, "collector.budget_usd: a budget needs prices"),
        ({"student": {"model": "/nonexistent/student"}}, "student.model: /nonexistent/student does not exist"),
        ({"rollout": {"group_size": 1, "prompts_per_step": 2}},
         "rollout.group_size: RewardWeighted compares the samples of a prompt"),
        ({"teacher": {"type": "judge", "model": "m", "base_url": "http://127.0.0.1:9/v1", "api_key_env": "OPD_UNSET_K"}},
         "teacher.api_key_env: the environment variable OPD_UNSET_K is not set"),
        ({"teacher": None, "teachers": [{"type": "verifier"}, {"type": "logprob", "model": "m",
                                          "base_url": "http://127.0.0.1:9/v1", "params": {"on_mismatch": "offset"}}],
          "objective": {"type": "hybrid", "params": {"terms": [{"type": "reward_weighted", "weight": 1.0},
                                                               {"type": "token_distill", "weight": 0.1, "source": 1}]}}},
         "teachers.1.params.on_mismatch: Input should be 'error' or 'offsets'"),
        ({"stpes": 3}, "stpes: unknown field: did you mean `steps`?"),
        ({"teacher": {"type": "judge", "modle": "m"}}, "teacher.modle: unknown field: did you mean `model`?"),
        ({"objective": {"type": "reward_weighted", "params": {"advantage": "rlooo"}}},
         "objective.params.advantage: Input should be 'reinforce', 'rloo' or 'grpo'"),
        ({"objective": {"type": "rewardweighted"}}, "did you mean 'reward_weighted'?"),
    ],
)
def test_each_mistake_is_caught_before_any_model_loads(tmp_path, tiny_dir, capsys, no_model_load, monkeypatch,  # noqa: F811
                                                        changes, expected, command):
    monkeypatch.delenv("OPD_UNSET_K", raising=False)
    rc, out, err = run_cli(capsys, "train", str(write_config(tmp_path, tiny_dir, **changes)), *command)
    assert rc == 2 and expected in err, err
    assert not (tmp_path / "run").exists()  # nothing written either


def test_data_without_prompts_or_answers(tmp_path, tiny_dir, capsys, no_model_load):  # noqa: F811
    rows = [{"prompt": f"What is {i} plus 1?", "answer": i + 1} for i in range(12)]
    write_rows(tmp_path / "bad.jsonl", rows[:3] + [{"question": "no prompt here"}] + rows[3:])
    rc, _, err = run_cli(capsys, "train", str(write_config(tmp_path, tiny_dir, data={"path": "bad.jsonl", "eval_size": 4})), "--check")
    assert rc == 2 and "bad.jsonl:4" in err and "prompt" in err, err
    write_rows(tmp_path / "noanswers.jsonl", [{"prompt": r["prompt"]} for r in rows])
    rc, _, err = run_cli(capsys, "train", str(write_config(tmp_path, tiny_dir, data={"path": "noanswers.jsonl", "eval_size": 4})))
    assert rc == 2 and "eval.metric: accuracy needs an answer for every held-out prompt" in err
    assert "eval.metric: teacher_score" in err  # the fix
    rc, _, err = run_cli(capsys, "train", str(write_config(tmp_path, tiny_dir, data={"path": "noanswers.jsonl", "eval_size": 12})))
    assert rc == 2 and "only 12 prompts, and eval_size=12 are held out; lower data.eval_size" in err


def test_all_problems_at_once(tmp_path, tiny_dir, capsys, no_model_load):  # noqa: F811
    path = write_config(tmp_path, tiny_dir, collector={"budget_usd": 1.0}, student={"model": "./missing"},
                        rollout={"group_size": 1})
    rc, _, err = run_cli(capsys, "train", str(path), "--check")
    lines = [line.strip() for line in err.splitlines()[1:]]
    assert rc == 2 and [line.split(":")[0] for line in lines] == ["rollout.group_size", "student.model", "collector.budget_usd"], err


def test_paths_are_relative_to_the_config_file(tmp_path, tiny_dir, capsys, monkeypatch, no_model_load):  # noqa: F811
    conf = tmp_path / "conf"
    conf.mkdir()
    write_rows(conf / "prompts.jsonl", [{"prompt": f"What is {i} plus 1?", "answer": i + 1} for i in range(12)])
    raw = yaml.safe_load(write_config(tmp_path, tiny_dir, data={"path": "prompts.jsonl", "eval_size": 4}).read_text())
    (conf / "run.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)  # not the config's folder
    rc, out, err = run_cli(capsys, "train", str(conf / "run.yaml"), "--check")
    assert rc == 0 and "is valid" in out, err


def test_valid_example_configs_pass_check(capsys, monkeypatch, no_model_load):  # noqa: F811
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    for path in sorted((Path(__file__).resolve().parents[2] / "examples" / "configs").glob("*.yaml")):
        rc, out, err = run_cli(capsys, "train", str(path), "--check")
        assert rc == 0, (path, err)


def test_eval_with_a_mistyped_model_folder_fails_at_once(tmp_path, tiny_dir, capsys):
    rc, _, err = run_cli(capsys, "eval", str(write_config(tmp_path, tiny_dir)), "--model", str(tmp_path / "fnal"))
    assert rc == 2 and "no such folder" in err


def test_an_unknown_field_does_not_hide_the_other_problems(tmp_path, capsys):
    """A misspelled field, a wrong objective/teacher pairing and a missing data file: all three at once."""
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({
        "student": {"model": "smollm2"},
        "data": {"path": "does_not_exist.jsonl"},
        "teacher": {"type": "verifier"},
        "objective": {"type": "spin"},
        "rollout": {"grop_size": 4},
    }))
    from opd_sdk.app import cli

    rc = cli.main(["train", str(path), "--check"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "rollout.grop_size: unknown field: did you mean `group_size`" in err
    assert "SPIN reads reference feedback" in err and "does_not_exist.jsonl does not exist" in err


@pytest.mark.parametrize("command", [["--check"], []])
def test_a_teacher_that_follows_the_student_is_refused_with_max_staleness(tmp_path, tiny_dir, capsys,
                                                                          no_model_load, command):  # noqa: F811
    """self_distill in live or ema mode, alone or inside a composite, cannot be asked ahead of its step."""
    live = {"type": "self_distill", "mode": "live"}
    composite = {"type": "weighted_sum", "teachers": [{"weight": 1.0, "teacher": {"type": "verifier"}},
                                                      {"weight": 1.0, "teacher": {"type": "self_distill", "mode": "ema"}}]}
    token = {"type": "token_distill"}
    fix = "follows the student's weights, so it cannot be asked ahead of the step that changes them; set rollout.max_staleness: 0"
    for teacher, objective, path in [(live, token, "teacher"), (composite, None, "teacher.teachers.1.teacher")]:
        changes = dict(teacher=teacher, rollout__max_staleness=1) | ({"objective": objective} if objective else {})
        rc, _, err = run_cli(capsys, "train", str(write_config(tmp_path, tiny_dir, **changes)), *command)
        assert rc == 2 and f"rollout.max_staleness: {path} (self_distill in live or ema mode) {fix}" in err, err
    frozen = write_config(tmp_path, tiny_dir, teacher=dict(live, mode="frozen"), objective=token, rollout__max_staleness=1)
    rc, out, err = run_cli(capsys, "train", str(frozen), "--check")
    assert rc == 0 and "is valid" in out, err
    rc, out, err = run_cli(capsys, "train", str(write_config(tmp_path, tiny_dir, teacher=live, objective=token)), "--check")
    assert rc == 0 and "is valid" in out, err


def test_accuracy_grades_with_the_verifier_found_anywhere_in_the_teacher_tree():
    from opd_sdk.app.runner import find_verifier
    from opd_sdk.config.run import validate_config

    def teacher(section: dict):
        return validate_config({"student": {"model": "smollm2"}, "data": {"task": "times_table"}, "teacher": section,
                                "objective": {"type": "reward_weighted"}}).teacher

    judge = {"type": "judge", "model": "m", "base_url": "http://127.0.0.1:9/v1"}
    exact = {"type": "verifier", "mode": "exact"}
    gate = teacher({"type": "gate", "verifier": exact, "judge": judge})
    assert find_verifier(gate) is gate.verifier
    summed = teacher({"type": "weighted_sum", "teachers": [{"weight": 1.0, "teacher": judge},
                                                           {"weight": 1.0, "teacher": exact}]})
    assert find_verifier(summed) is summed.teachers[1].teacher and summed.teachers[1].teacher.mode == "exact"
    assert find_verifier(teacher(judge)) is None
