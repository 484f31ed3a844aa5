"""registry: every teacher type builds the real provider from its config, keys only from the environment,
and returns the feedback kind its declaration says."""

from __future__ import annotations

import asyncio
import json

import pytest

from opd_sdk.config.registry import (
    TEACHERS,
    BuildContext,
    build_objective,
    build_teacher,
)
from opd_sdk.config.run import validate_config
from opd_sdk.errors import ConfigError
from tests.loop_fixtures import tiny_model, tiny_tokenizer
from tests.scripted_server import ScriptedServer

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


def _scripted(body: dict):
    """One server for every API teacher: a judge score, a preference verdict, a reference text."""
    schema = json.dumps(body.get("response_format") or {})
    text = " ".join(m["content"] for m in body.get("messages", []) if isinstance(m.get("content"), str))
    if '"winner"' in schema or '"winner"' in text:
        return '{"winner": "A"}'
    if '"score"' in schema or "score" in text.lower():
        return '{"score": 7}'
    return "3 plus 4 is 7."


def _case(kind: str, url: str) -> dict:
    """A working config of each declared teacher type against the scripted server (KeyError: add one)."""
    judge = {"type": "judge", "model": "m", "base_url": url}
    return {
        "judge": judge,
        "preference": {"type": "preference", "model": "m", "base_url": url},
        "reference": {"type": "reference", "model": "m", "base_url": url},
        "logprob": {"type": "logprob", "model": "m", "base_url": url, "params": {"send": "token_ids"}},
        "reward_model": {"type": "reward_model", "url": url.removesuffix("/v1") + "/reward"},
        "verifier": {"type": "verifier"},
        "self_distill": {"type": "self_distill", "mode": "frozen"},
        "weighted_sum": {"type": "weighted_sum", "teachers": [{"weight": 1.0, "teacher": {"type": "verifier"}}]},
        "gate": {"type": "gate", "verifier": {"type": "verifier"}, "judge": judge},
        "preference_to_score": {"type": "preference_to_score",
                                "teacher": {"type": "preference", "model": "m", "base_url": url}},
        "gad": {"type": "gad", "teacher": {"type": "reference", "model": "m", "base_url": url}},
    }[kind]


@pytest.mark.parametrize("kind", sorted(TEACHERS))
def test_every_declared_type_builds_and_returns_its_declared_feedback_kind(kind, monkeypatch):
    """Parametrised over the declarations themselves: a new type without a working case here fails."""
    from opd_sdk.types import Completion, FeedbackRequest
    from tests.providers.test_self_distill import make_model, make_tokenizer
    from tests.test_examples import EchoLogprobs

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    tok = make_tokenizer()
    ctx = BuildContext(model=make_model(tok), tokenizer=tok)
    echo = EchoLogprobs(tok)
    responder = lambda body: echo(body) if "prompt" in body else _scripted(body)  # noqa: E731
    reward = {"/reward": lambda body: {"rewards": [0.25] * len(body["query"])}}
    with ScriptedServer(responder, handlers=reward) as srv:
        teacher = teacher_of(_case(kind, srv.base_url), ctx)
        assert isinstance(teacher, TEACHERS[kind].provider)
        prompt = [{"role": "user", "content": "What is 3 plus 4?"}]
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in ("7", "8")]
        request = FeedbackRequest(prompt=prompt, completions=[Completion(text="7", token_ids=ids[0]),
                                                              Completion(text="8", token_ids=ids[1])],
                                  privileged="The answer is 7.", metadata={"answer": 7})
        feedback = asyncio.run(teacher.feedback(request))
    assert feedback.kind == TEACHERS[kind].feedback, feedback


def test_objectives_get_the_tokenizer_and_hybrid_terms():
    from opd_sdk.config.run import ObjectiveConfig

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
