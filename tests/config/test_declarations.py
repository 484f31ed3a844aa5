"""One declaration per teacher and per objective: the YAML section's defaults are the Python
constructor's, and both the YAML and the Python path check parameters through the same model."""

from __future__ import annotations

import inspect

import pytest

from opd_sdk.config.registry import TEACHERS, build_objective, params_problems
from opd_sdk.config.run import ObjectiveConfig
from opd_sdk.errors import ConfigError
from opd_sdk.objectives import OBJECTIVES, RewardWeighted
from providers.self_distill import PrivilegedTemplate, SelfDistillTeacher
from tests.loop_fixtures import tiny_tokenizer


def constructor_defaults(cls: type) -> dict:
    return {name: p.default for name, p in inspect.signature(cls).parameters.items() if p.default is not p.empty}


@pytest.mark.parametrize("kind", sorted(TEACHERS))
def test_a_teacher_section_and_its_provider_agree_on_every_default(kind):
    """Every field of the YAML section that the provider's constructor also takes has one default."""
    section = TEACHERS[kind]
    python = constructor_defaults(section.provider)
    shared = [name for name in section.model_fields if name in python]
    assert set(section.provider_params.model_fields) <= set(shared), "a declared parameter the provider lacks"
    yaml_defaults = {name: section.model_fields[name].default for name in shared}
    assert yaml_defaults == {name: python[name] for name in shared}


def test_self_distill_is_frozen_by_default_from_yaml_and_python():
    """They disagreed (frozen from YAML, live from Python); frozen is the one that learns (README)."""
    assert TEACHERS["self_distill"].model_fields["mode"].default == "frozen"
    assert inspect.signature(SelfDistillTeacher).parameters["mode"].default == "frozen"
    template = PrivilegedTemplate()
    section = TEACHERS["self_distill"].model_fields
    assert (section["placement"].default, section["template"].default) == (template.placement, template.text)


@pytest.mark.parametrize("name", sorted(set(OBJECTIVES) - {"hybrid"}))
def test_an_objective_built_without_params_holds_its_declared_defaults(name):
    cls = OBJECTIVES[name]
    built = build_objective(ObjectiveConfig(type=name), tiny_tokenizer())
    declared = cls.params_model()
    assert {k: getattr(built, k) for k in type(declared).model_fields} == dict(declared)
    assert set(constructor_defaults(cls)).isdisjoint(type(declared).model_fields)  # no second copy of a default


def test_python_and_yaml_refuse_the_same_value_through_the_same_model():
    assert RewardWeighted(advantage="grpo", beta=0.1).advantage == "grpo"
    with pytest.raises(ConfigError, match="RewardWeighted: clip_eps: Input should be less than 1"):
        RewardWeighted(clip_eps=2.0)
    with pytest.raises(ConfigError, match="RewardWeighted: advantge: unknown parameter"):
        RewardWeighted(advantge="rloo")
    problems = params_problems(RewardWeighted.params_model, {"clip_eps": 2.0, "advantge": "rloo"},
                               "objective.params", "RewardWeighted")
    assert problems == [
        "objective.params.clip_eps: Input should be less than 1",
        "objective.params.advantge: unknown parameter for RewardWeighted; did you mean `advantage`? valid: "
        + ", ".join(RewardWeighted.params_model.model_fields),
    ]


def test_hybrid_declares_its_terms_like_any_objective():
    """No special case by name: its terms are checked by its params model, built through the registry."""
    with pytest.raises(ConfigError, match=r"objective.params.terms: List should have at least 1 item"):
        build_objective(ObjectiveConfig(type="hybrid", params={"terms": []}))
    with pytest.raises(ConfigError, match=r"objective.params.terms.1.params.gama: unknown parameter for TokenDistill; "
                                          r"did you mean `gamma`\?"):
        build_objective(ObjectiveConfig(type="hybrid", params={"terms": [
            {"type": "reward_weighted", "weight": 1.0}, {"type": "token_distill", "weight": 0.5, "params": {"gama": 1}},
        ]}))
    with pytest.raises(ConfigError, match=r"objective.params: Hybrid names must be 1 distinct strings"):
        build_objective(ObjectiveConfig(type="hybrid", params={"terms": [{"type": "sft", "weight": 1.0}],
                                                               "names": ["a", "b"]}))
