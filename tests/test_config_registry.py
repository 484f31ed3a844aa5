"""registry: every teacher type builds the real provider from its config, keys only from the environment."""

from __future__ import annotations

import pytest

from opd_sdk.config import validate_config
from opd_sdk.errors import ConfigError
from opd_sdk.registry import TEACHER_FACTORIES, BuildContext, build_objective, build_teacher
from tests.loop_fixtures import tiny_model, tiny_tokenizer

LOCAL = "http://127.0.0.1:9/v1"
JUDGE = {"type": "judge", "model": "m", "base_url": LOCAL, "api_key_env": "OPD_REG_KEY", "scale": [1, 5]}


def teacher_of(cfg: dict, ctx: BuildContext | None = None):
    raw = {"student": {"model": "x"}, "data": {"task": "addition"}, "objective": {"type": "sft"}, "teacher": cfg}
    return build_teacher(validate_config(raw).teacher, ctx)


@pytest.mark.parametrize(
    "cfg, cls",
    [
        (JUDGE, "JudgeTeacher"),
        ({"type": "preference", "model": "m", "base_url": LOCAL}, "PreferenceTeacher"),
        ({"type": "reference", "model": "m", "base_url": LOCAL, "n": 2}, "ReferenceTeacher"),
        ({"type": "logprob", "model": "m", "base_url": LOCAL, "top_k": 3}, "LogprobTeacher"),
        ({"type": "reward_model", "url": "http://127.0.0.1:9/reward"}, "RewardModelTeacher"),
        ({"type": "verifier", "mode": "exact"}, "VerifierTeacher"),
        ({"type": "weighted_sum", "teachers": [{"weight": 0.5, "teacher": {"type": "verifier"}},
                                                {"weight": 0.5, "teacher": JUDGE}]}, "WeightedSum"),
        ({"type": "gate", "verifier": {"type": "verifier"}, "judge": JUDGE}, "Gate"),
        ({"type": "preference_to_score", "teacher": {"type": "preference", "model": "m", "base_url": LOCAL}},
         "PreferenceScores"),
    ],
)
def test_each_type_builds_its_provider_and_never_carries_the_key(cfg, cls, monkeypatch):
    monkeypatch.setenv("OPD_REG_KEY", "sk-REGISTRY-SECRET")
    teacher = teacher_of(cfg, BuildContext(tokenizer=tiny_tokenizer()))
    assert type(teacher).__name__ == cls
    assert "REGISTRY-SECRET" not in teacher.id and "REGISTRY-SECRET" not in repr(teacher)


def test_the_key_named_by_api_key_env_reaches_the_client(monkeypatch):
    monkeypatch.setenv("OPD_REG_KEY", "sk-REGISTRY-SECRET")
    teacher = teacher_of(JUDGE)
    assert teacher.endpoint.client.api_key == "sk-REGISTRY-SECRET"
    assert teacher.endpoint.client.base_url.host == "127.0.0.1"


def test_self_distill_builds_on_the_student():
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    teacher = teacher_of({"type": "self_distill", "mode": "frozen", "placement": "system"},
                         BuildContext(model=model, tokenizer=tok))
    assert type(teacher).__name__ == "SelfDistillTeacher" and teacher.cacheable
    ema = teacher_of({"type": "self_distill", "mode": "ema", "ema_decay": 0.9}, BuildContext(model=model, tokenizer=tok))
    assert ema.mode == "ema" and not ema.cacheable
    with pytest.raises(ConfigError, match="needs the student model"):
        teacher_of({"type": "self_distill"})


def test_every_config_type_has_a_factory():
    assert set(TEACHER_FACTORIES) == {
        "judge", "preference", "reference", "logprob", "reward_model", "verifier",
        "self_distill", "weighted_sum", "gate", "preference_to_score",
    }


def test_objectives_get_the_tokenizer_and_hybrid_terms():
    from opd_sdk.config import ObjectiveConfig

    tok = tiny_tokenizer()
    spin = build_objective(ObjectiveConfig(type="spin", params={"source": "answer"}), tok)
    assert spin.tokenizer is tok and spin.feedback_kinds == ()
    hybrid = build_objective(
        ObjectiveConfig(type="hybrid", params={"terms": [
            {"type": "token_distill", "weight": 1.0},
            {"type": "reward_weighted", "params": {"advantage": "grpo"}, "weight": 0.5},
        ]}),
        tok,
    )
    assert [w for _, w, _ in hybrid.terms] == [1.0, 0.5]
    assert set(hybrid.feedback_kinds) == {"token_logprobs", "score"}
