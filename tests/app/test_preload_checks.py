"""Every check that needs no weights, in one pass, before loading (issue 24, items 4 and 5): schema
errors do not hide the other checks, and what used to fail minutes into a run (a judge scale [10, 0],
a read-only output_dir, a prompt longer than the student's context, LoRA without peft) fails at
`--check` with its YAML path and the fix, leaving nothing in output_dir."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.app.test_cli import no_model_load, run_cli, write_config  # noqa: F401


def write_rows(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_every_problem_in_one_pass_schema_errors_included(tmp_path, tiny_dir, capsys, no_model_load,  # noqa: F811
                                                         monkeypatch):
    """A bad value (optimizer.lr), a missing model folder and data file, an unset key, a budget with no
    price, and a bad objective parameter that used to hide the group-size check: all in one report."""
    monkeypatch.delenv("OPD_UNSET_K", raising=False)
    judge = {"type": "judge", "model": "m", "base_url": "http://127.0.0.1:9/v1", "api_key_env": "OPD_UNSET_K"}
    path = write_config(tmp_path, tiny_dir, optimizer={"lr": -1}, student={"model": "./missing"},
                        data={"path": "nowhere.jsonl"}, teacher=judge, collector={"budget_usd": 1.0},
                        objective={"type": "reward_weighted", "params": {"advantage": "rlooo"}},
                        rollout={"group_size": 1, "prompts_per_step": 2})
    rc, out, err = run_cli(capsys, "train", str(path), "--check")
    assert rc == 2, out
    paths = [line.strip().split(":")[0] for line in err.splitlines()[1:]]
    for expected in ("optimizer.lr", "student.model", "data.path", "teacher.api_key_env", "collector.budget_usd",
                     "objective.params.advantage", "rollout.group_size"):
        assert expected in paths, (expected, err)
    assert len(paths) == len(set(paths)), err  # each once


def test_a_required_field_missing_in_a_section_does_not_hide_the_rest(tmp_path, tiny_dir, capsys, no_model_load):  # noqa: F811
    path = write_config(tmp_path, tiny_dir, teacher={"type": "judge"}, collector={"budget_usd": 1.0})
    rc, _, err = run_cli(capsys, "train", str(path), "--check")
    assert rc == 2 and "teacher.model: required field is missing" in err and "collector.budget_usd" in err, err
    assert "add a `teacher:` section" not in err  # the dropped teacher is not reported again as absent


@pytest.mark.parametrize("command", [["--check"], []])
def test_a_judge_scale_upside_down_is_caught_before_loading_with_its_yaml_path(
        tmp_path, tiny_dir, capsys, no_model_load, command):  # noqa: F811
    judge = {"type": "judge", "model": "m", "base_url": "http://127.0.0.1:9/v1", "scale": [10, 0]}
    rc, _, err = run_cli(capsys, "train", str(write_config(tmp_path, tiny_dir, teacher=judge)), *command)
    assert rc == 2 and "teacher.scale: need two integers lo < hi, got (10, 0)" in err, err
    gate = {"type": "gate", "verifier": {"type": "verifier"}, "judge": dict(judge, scale=[0, 10], g_eval=True)}
    rc, _, err = run_cli(capsys, "train", str(write_config(tmp_path, tiny_dir, teacher=gate)), *command)
    assert rc == 2 and "teacher.judge.g_eval: every score must be one token" in err, err
    assert not (tmp_path / "run").exists()  # nothing written: the corrected rerun is not refused


def test_a_missing_key_does_not_hide_what_the_teachers_constructor_refuses(tmp_path, tiny_dir, capsys,
                                                                          no_model_load, monkeypatch):  # noqa: F811
    monkeypatch.delenv("OPD_UNSET_K", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    judge = {"type": "judge", "model": "m", "api_key_env": "OPD_UNSET_K", "scale": [10, 0]}
    rm = {"type": "reward_model", "url": "http://127.0.0.1:9/score", "api_key_env": "OPD_UNSET_K", "normalize": [1, 1]}
    for teacher, refused in ((judge, "teacher.scale: need two integers lo < hi"), (rm, "teacher.normalize: need (lo, hi) with lo < hi")):
        rc, _, err = run_cli(capsys, "train", str(write_config(tmp_path, tiny_dir, teacher=teacher)), "--check")
        assert rc == 2 and "teacher.api_key_env: the environment variable OPD_UNSET_K is not set" in err, err
        assert refused in err and "placeholder" not in err, err


def read_only_dir(tmp_path: Path) -> Path:
    """A folder this process cannot write in: chmod 0555, or (root ignores modes) /proc/sys."""
    if os.geteuid() == 0:
        return Path("/proc/sys")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


@pytest.mark.parametrize("command", [["--check"], []])
def test_a_read_only_output_dir_is_a_clear_error(tmp_path, tiny_dir, capsys, no_model_load, command):  # noqa: F811
    target = read_only_dir(tmp_path) / "opd-run"
    rc, _, err = run_cli(capsys, "train", str(write_config(tmp_path, tiny_dir, output_dir=str(target))), *command)
    assert rc == 2 and f"output_dir: {target.parent} is read-only" in err and "--set output_dir=" in err, err
    blocked = tmp_path / "afile"
    blocked.write_text("x")
    rc, _, err = run_cli(capsys, "train", str(write_config(tmp_path, tiny_dir, output_dir=str(blocked / "run"))), *command)
    assert rc == 2 and f"output_dir: {blocked} is a file, not a folder" in err, err


def test_writing_into_a_read_only_output_dir_is_a_config_error_not_an_oserror(tmp_path):
    from opd_sdk.app.runner import prepare_output_dir, save_resolved_config
    from opd_sdk.config.run import validate_config
    from opd_sdk.errors import ConfigError

    target = read_only_dir(tmp_path) / "opd-run"
    cfg = validate_config({"student": {"model": "x"}, "data": {"task": "addition"}, "objective": {"type": "sft"},
                           "output_dir": str(target)})
    prepare_output_dir(target, resume=False, overwrite=False)  # nothing there: nothing to do
    with pytest.raises(ConfigError, match=r"cannot write there \(.*\); choose a folder you can write"):
        save_resolved_config(cfg)


def long_prompts(tmp_path: Path) -> Path:
    """12 short prompts and, on line 3 (after a blank line 2), one of 300 characters: the tiny
    model's context is 256 tokens and its tokenizer reads a character a token."""
    rows = [json.dumps({"prompt": f"What is {i} plus 1?", "answer": str(i + 1)}) for i in range(12)]
    long = json.dumps({"prompt": "What is " + "1 plus " * 42 + "1?", "answer": "43"})
    return write_rows(tmp_path / "prompts.jsonl", [rows[0], "", long, *rows[1:]])


def test_a_prompt_longer_than_the_context_is_named_by_file_and_line_at_check(
        tmp_path, tiny_dir, capsys, no_model_load):  # noqa: F811
    long_prompts(tmp_path)
    path = write_config(tmp_path, tiny_dir, data={"path": "prompts.jsonl", "eval_size": 4})
    rc, _, err = run_cli(capsys, "train", str(path), "--check")
    assert rc == 2, err
    assert "data: 1 prompt(s) (1 training, 0 held-out) do not fit the student's context: 256 tokens" in err
    assert f"{tmp_path / 'prompts.jsonl'}:3 (" in err and "room for 252" in err and "data.too_long: skip" in err


def test_too_long_skip_leaves_the_prompt_out_counted_and_trains(tmp_path, tiny_dir, capsys):
    long_prompts(tmp_path)
    path = write_config(tmp_path, tiny_dir, data={"path": "prompts.jsonl", "eval_size": 4, "too_long": "skip"},
                        steps=1)
    rc, out, err = run_cli(capsys, "train", str(path), "--check")
    assert rc == 0, err
    rc, out, err = run_cli(capsys, "train", str(path))
    assert rc == 0, err
    assert "left out 1 of 9 training and 0 of 4 held-out prompts that do not fit 256 tokens" in out, out


def test_prompts_not_measured_at_check_are_measured_before_the_weights_load(tmp_path, tiny_dir):
    """When the check could not read the student's tokenizer (a model not downloaded yet, an hf_dataset),
    the run measures the prompts before loading the weights."""
    from opd_sdk.app.runner import _fitting_prompts
    from opd_sdk.config.registry import Checked
    from opd_sdk.config.run import load_config
    from opd_sdk.errors import ConfigError

    long_prompts(tmp_path)
    cfg = load_config(write_config(tmp_path, tiny_dir, data={"path": "prompts.jsonl", "eval_size": 4}))
    with pytest.raises(ConfigError, match=r"prompts.jsonl:3 \(\d+ tokens, room for 252\)"):
        _fitting_prompts(cfg, Checked(objective=None, data=None))


@pytest.mark.parametrize("command", [["--check"], []])
def test_lora_without_peft_fails_at_check_with_the_install_command(tmp_path, tiny_dir, capsys, no_model_load,  # noqa: F811
                                                                   monkeypatch, command):
    monkeypatch.setitem(sys.modules, "peft", None)  # not importable: find_spec says None, import raises
    path = write_config(tmp_path, tiny_dir, student={"model": str(tiny_dir), "lora": {"r": 4}})
    rc, _, err = run_cli(capsys, "train", str(path), *command)
    assert rc == 2 and "student.lora: LoRA needs the peft package" in err and "pip install 'opd-sdk[peft]'" in err, err
    assert not (tmp_path / "run").exists()
