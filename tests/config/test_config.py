"""Config validation: every bad field is named, says how to fix it, and never echoes a secret."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from opd_sdk.config.run import (
    RunConfig,
    apply_overrides,
    load_config,
    parse_override,
    validate_config,
)
from opd_sdk.config.teachers import (
    GateTeacherConfig,
    JudgeTeacherConfig,
    VerifierTeacherConfig,
    WeightedSumTeacherConfig,
)
from opd_sdk.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "configs"


def minimal() -> dict:
    return {
        "student": {"model": "smollm2"},
        "data": {"task": "times_table"},
        "teacher": {"type": "verifier"},
        "objective": {"type": "reward_weighted", "params": {"advantage": "rloo"}},
    }


def error_of(raw: dict) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    return str(info.value)


def test_minimal_config_fills_defaults():
    cfg = validate_config(minimal())
    assert isinstance(cfg, RunConfig)
    assert isinstance(cfg.teacher, VerifierTeacherConfig)
    assert cfg.rollout.group_size == 4 and cfg.optimizer.lr == 1e-5 and cfg.steps == 100
    assert cfg.cache_path() == Path("runs/opd") / "feedback_cache.sqlite"


def test_literal_api_key_is_refused_without_echoing_it():
    raw = minimal()
    raw["teacher"] = {"type": "judge", "model": "gpt-4o-mini", "api_key": "sk-live-SECRET123"}
    msg = error_of(raw)
    assert "teacher" in msg and "`api_key`" in msg and "api_key_env" in msg and "export" in msg
    assert "SECRET123" not in msg


def test_key_hidden_in_params_is_refused():
    raw = minimal()
    raw["teacher"] = {"type": "reference", "model": "m", "params": {"api_key": "sk-SECRET9"}}
    msg = error_of(raw)
    assert "params.api_key" in msg and "SECRET9" not in msg


def test_api_key_env_holding_a_key_is_refused_without_echoing_it():
    raw = minimal()
    raw["teacher"] = {"type": "judge", "model": "m", "api_key_env": "sk-proj-SECRET456"}
    msg = error_of(raw)
    assert "teacher.api_key_env:" in msg and "NAME of an environment variable" in msg
    assert "SECRET456" not in msg


def test_unknown_teacher_type_lists_the_choices():
    raw = minimal()
    raw["teacher"] = {"type": "jugde"}
    msg = error_of(raw)
    assert "teacher: unknown type: use one of" in msg and "'judge'" in msg and "'self_distill'" in msg


def test_missing_teacher_type_says_to_add_it():
    raw = minimal()
    raw["teacher"] = {"model": "m"}
    assert "teacher: add `type:`" in error_of(raw)


def test_typo_and_range_errors_name_each_field():
    raw = minimal()
    raw["optimizer"] = {"lr": -1.0, "lrr": 2}
    raw["rollout"] = {"group_size": 0}
    msg = error_of(raw)
    assert "optimizer.lr: Input should be greater than 0" in msg
    assert "optimizer.lrr: unknown field" in msg
    assert "rollout.group_size: Input should be greater than 0" in msg


def test_missing_required_sections():
    msg = error_of({"student": {"model": "x"}})
    for name in ("data", "objective"):
        assert f"{name}: required field is missing" in msg
    assert "teacher" not in msg  # optional: teacher-free objectives (SFT, SPIN on data answers)


def test_data_needs_exactly_one_source():
    raw = minimal()
    raw["data"] = {"path": "a.jsonl", "task": "times_table"}
    assert "data: set exactly one data source" in error_of(raw)
    raw["data"] = {}
    assert "data: set exactly one data source" in error_of(raw)


def test_nested_composition_paths_drop_the_union_tag():
    raw = minimal()
    raw["teacher"] = {
        "type": "gate",
        "verifier": {"type": "verifier", "mode": "regex"},
        "judge": {"type": "weighted_sum", "teachers": [{"weight": 1.0, "teacher": {"type": "judge"}}]},
    }
    msg = error_of(raw)
    assert "teacher.verifier: mode `regex` needs `pattern:" in msg
    assert "teacher.judge.teachers.0.teacher.model: required field is missing" in msg


def test_composition_parses_into_typed_models():
    raw = minimal()
    raw["teacher"] = {
        "type": "gate",
        "verifier": {"type": "verifier"},
        "judge": {
            "type": "weighted_sum",
            "teachers": [
                {"weight": 0.7, "teacher": {"type": "judge", "model": "m", "base_url": "http://127.0.0.1:1/v1"}},
                {"weight": 0.3, "teacher": {"type": "verifier", "mode": "exact"}},
            ],
        },
    }
    cfg = validate_config(raw)
    assert isinstance(cfg.teacher, GateTeacherConfig)
    inner = cfg.teacher.judge
    assert isinstance(inner, WeightedSumTeacherConfig)
    assert isinstance(inner.teachers[0].teacher, JudgeTeacherConfig)
    assert inner.teachers[0].teacher.api_key_env == "OPENAI_API_KEY"


def test_overrides_are_typed_by_the_model():
    raw = apply_overrides(
        minimal(),
        ["optimizer.lr=3e-6", "rollout.group_size=8", "student.lora.r=4", "seed=7", "collector.rpm=600"],
    )
    cfg = validate_config(raw)
    assert cfg.optimizer.lr == pytest.approx(3e-6) and isinstance(cfg.optimizer.lr, float)
    assert cfg.rollout.group_size == 8 and cfg.student.lora is not None and cfg.student.lora.r == 4
    assert cfg.seed == 7 and cfg.collector.rpm == 600.0


def test_override_can_switch_teacher_and_index_lists():
    raw = minimal()
    raw["teacher"] = {"type": "weighted_sum", "teachers": [{"weight": 1, "teacher": {"type": "verifier"}}]}
    cfg = validate_config(apply_overrides(raw, ["teacher.teachers.0.weight=0.25"]))
    assert cfg.teacher.teachers[0].weight == 0.25
    with pytest.raises(ConfigError, match=r"`teacher.teachers.3` is not an index"):
        apply_overrides(raw, ["teacher.teachers.3.weight=1"])


def test_override_with_a_bad_value_names_the_field():
    raw = apply_overrides(minimal(), ["rollout.temperature=hot"])
    assert "rollout.temperature: Input should be a valid number" in error_of(raw)


@pytest.mark.parametrize("text", ["optimizer.lr", "=3", "a..b=1"])
def test_malformed_override_says_how_to_write_it(text):
    with pytest.raises(ConfigError, match="--set"):
        parse_override(text)


def test_load_config_reads_yaml_and_reports_a_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(minimal()))
    cfg = load_config(path, ["steps=3"])
    assert cfg.steps == 3
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)


def test_example_configs_pass_every_check_that_needs_no_model(monkeypatch):
    from opd_sdk.config.registry import check_config

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    paths = sorted(EXAMPLES.glob("*.yaml"))
    assert len(paths) >= 4, "examples/configs/ should hold the example configs"
    for path in paths:
        check_config(load_config(path))
