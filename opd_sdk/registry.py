"""Config `type` -> the class that builds it, for teachers and objectives.

Two small dicts and plain functions, no plugin magic:

- `OBJECTIVES` (from opd_sdk.objectives): objective name -> class; the
  config's `params` are its keyword arguments.
- `TEACHER_FACTORIES`: teacher type -> a function (config, context) ->
  Teacher. Compositions build their children recursively.

`check_config(cfg)` runs every check that needs no model: objective and
teacher parameters against the constructors' signatures, API keys present in
the environment, the teacher's feedback kind readable by the objective. The
CLI calls it before loading anything heavy, so a typo costs a second, not a
model load.
"""

from __future__ import annotations

import importlib
import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable

from opd_sdk.config import (
    GateTeacherConfig,
    JudgeTeacherConfig,
    LogprobTeacherConfig,
    ObjectiveConfig,
    PreferenceTeacherConfig,
    PreferenceToScoreConfig,
    ReferenceTeacherConfig,
    RewardModelTeacherConfig,
    RunConfig,
    SelfDistillTeacherConfig,
    VerifierTeacherConfig,
    WeightedSumTeacherConfig,
)
from opd_sdk.errors import ConfigError


@dataclass
class BuildContext:
    """What a teacher factory may need besides its config: the student (self-distillation,
    tokenizer matching) and the per-call timeout."""

    model: Any = None
    tokenizer: Any = None
    timeout: float = 60.0


# What each teacher type returns: lets check_config refuse an objective that cannot read it.
FEEDBACK_KIND = {
    "judge": "score",
    "verifier": "score",
    "reward_model": "score",
    "weighted_sum": "score",
    "gate": "score",
    "preference_to_score": "score",
    "preference": "preference",
    "reference": "reference",
    "logprob": "token_logprobs",
    "self_distill": "token_logprobs",
}


PROVIDER_MODULES = {
    "JudgeTeacher": "providers.judge",
    "PreferenceTeacher": "providers.preference",
    "ReferenceTeacher": "providers.reference",
    "LogprobTeacher": "providers.logprob",
    "RewardModelTeacher": "providers.reward_model",
    "VerifierTeacher": "providers.verifier",
    "SelfDistillTeacher": "providers.self_distill",
    "PrivilegedTemplate": "providers.self_distill",
    "WeightedSum": "providers.compose",
    "Gate": "providers.compose",
    "PreferenceScores": "providers.compose",
}


def _provider(name: str) -> Any:
    """The provider class `name`, imported when first needed."""
    return getattr(importlib.import_module(PROVIDER_MODULES[name]), name)


def _api_key(cfg: Any, where: str) -> str | None:
    """The key from the variable the config names; a missing key is an error only for a remote API."""
    name = cfg.api_key_env
    key = os.environ.get(name) if name else None
    remote = getattr(cfg, "base_url", None) is None and not os.environ.get("OPENAI_BASE_URL")
    if name and not key and remote and cfg.type != "reward_model":
        raise ConfigError(
            f"{where}.api_key_env: the environment variable {name} is not set. "
            f"`export {name}=...` before running, or set {where}.base_url to a local server that needs no key"
        )
    return key


def _kwargs(cfg: Any, fields: tuple[str, ...]) -> dict[str, Any]:
    out = {f: getattr(cfg, f) for f in fields if getattr(cfg, f) is not None}
    out.update(cfg.params)
    return out


def _judge(cfg: JudgeTeacherConfig, ctx: BuildContext, where: str) -> Any:
    kw = _kwargs(cfg, ("rubric", "scale", "mode", "g_eval", "temperature"))
    return _provider("JudgeTeacher")(
        cfg.model, base_url=cfg.base_url, api_key=_api_key(cfg, where), timeout=ctx.timeout, **kw
    )


def _preference(cfg: PreferenceTeacherConfig, ctx: BuildContext, where: str) -> Any:
    kw = _kwargs(cfg, ("criteria", "allow_ties"))
    return _provider("PreferenceTeacher")(
        cfg.model, base_url=cfg.base_url, api_key=_api_key(cfg, where), timeout=ctx.timeout, **kw
    )


def _reference(cfg: ReferenceTeacherConfig, ctx: BuildContext, where: str) -> Any:
    kw = _kwargs(cfg, ("n", "temperature", "max_tokens"))
    return _provider("ReferenceTeacher")(
        cfg.model, base_url=cfg.base_url, api_key=_api_key(cfg, where), timeout=ctx.timeout, **kw
    )


def _logprob(cfg: LogprobTeacherConfig, ctx: BuildContext, where: str) -> Any:
    kw = _kwargs(cfg, ("top_k",))
    return _provider("LogprobTeacher")(
        cfg.model,
        tokenizer=ctx.tokenizer,
        base_url=cfg.base_url,
        api_key=_api_key(cfg, where),
        timeout=ctx.timeout,
        **kw,
    )


def _reward_model(cfg: RewardModelTeacherConfig, ctx: BuildContext, where: str) -> Any:
    return _provider("RewardModelTeacher")(cfg.url, api_key=_api_key(cfg, where), timeout=ctx.timeout, **cfg.params)


def _verifier(cfg: VerifierTeacherConfig, ctx: BuildContext, where: str) -> Any:
    kw = _kwargs(cfg, ("mode", "atol", "rtol", "pattern"))
    return _provider("VerifierTeacher")(**kw)


def _self_distill(cfg: SelfDistillTeacherConfig, ctx: BuildContext, where: str) -> Any:
    if ctx.model is None or ctx.tokenizer is None:
        raise ConfigError(f"{where}: a self_distill teacher needs the student model and tokenizer")
    template = _provider("PrivilegedTemplate")(placement=cfg.placement, text=cfg.template)
    kw = dict(mode=cfg.mode, ema_decay=cfg.ema_decay, top_k=cfg.top_k, template=template, **cfg.params)
    return _provider("SelfDistillTeacher")(ctx.model, ctx.tokenizer, **kw)


def _weighted_sum(cfg: WeightedSumTeacherConfig, ctx: BuildContext, where: str) -> Any:
    parts = [
        (build_teacher(w.teacher, ctx, f"{where}.teachers.{i}.teacher"), w.weight) for i, w in enumerate(cfg.teachers)
    ]
    return _provider("WeightedSum")(parts)


def _gate(cfg: GateTeacherConfig, ctx: BuildContext, where: str) -> Any:
    verifier = build_teacher(cfg.verifier, ctx, f"{where}.verifier")
    judge = build_teacher(cfg.judge, ctx, f"{where}.judge")
    return _provider("Gate")(verifier, judge, threshold=cfg.threshold, fail_score=cfg.fail_score)


def _preference_to_score(cfg: PreferenceToScoreConfig, ctx: BuildContext, where: str) -> Any:
    inner = build_teacher(cfg.teacher, ctx, f"{where}.teacher")
    return _provider("PreferenceScores")(inner, method=cfg.method)


TEACHER_FACTORIES: dict[str, Callable[[Any, BuildContext, str], Any]] = {
    "judge": _judge,
    "preference": _preference,
    "reference": _reference,
    "logprob": _logprob,
    "reward_model": _reward_model,
    "verifier": _verifier,
    "self_distill": _self_distill,
    "weighted_sum": _weighted_sum,
    "gate": _gate,
    "preference_to_score": _preference_to_score,
}

# The provider class each leaf type builds (for signature checks of `params`).
TEACHER_CLASSES = {
    "judge": "JudgeTeacher",
    "preference": "PreferenceTeacher",
    "reference": "ReferenceTeacher",
    "logprob": "LogprobTeacher",
    "reward_model": "RewardModelTeacher",
    "verifier": "VerifierTeacher",
    "self_distill": "SelfDistillTeacher",
}


def build_teacher(cfg: Any, ctx: BuildContext | None = None, where: str = "teacher") -> Any:
    """The Teacher a config describes; TypeErrors from a constructor become ConfigErrors naming the field."""
    ctx = ctx or BuildContext()
    try:
        return TEACHER_FACTORIES[cfg.type](cfg, ctx, where)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}; check {where}.params against the provider's arguments") from None


def _objective_classes() -> dict[str, type]:
    from opd_sdk.objectives import OBJECTIVES

    return OBJECTIVES


def _check_params(cls: type, params: dict[str, Any], where: str, positional: int = 0) -> None:
    """Refuse keyword arguments the constructor does not take, naming them and listing the valid ones."""
    sig = inspect.signature(cls.__init__)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    names = [
        n for n, p in sig.parameters.items() if n not in ("self", "tokenizer") and p.kind is not p.VAR_POSITIONAL
    ]
    unknown = sorted(set(params) - set(names[positional:]))
    if unknown:
        raise ConfigError(
            f"{where}: unknown parameter(s) {', '.join(unknown)} for {cls.__name__}; "
            f"valid: {', '.join(names[positional:])}"
        )


def build_objective(cfg: ObjectiveConfig, tokenizer: Any = None, where: str = "objective") -> Any:
    """The objective `cfg.type` with `cfg.params` as keyword arguments (cheap: no model copies yet).

    Objectives that take the student's tokenizer (SFT, SPIN) get `tokenizer`;
    `check_config` builds them with None, which their constructors only store.
    `hybrid` takes params {terms: [{type, params, weight, source}, ...]}; a
    term's `source` (default 0) indexes the run's `teachers:` list.
    """
    classes = _objective_classes()
    if cfg.type not in classes:
        raise ConfigError(f"{where}.type: unknown objective {cfg.type!r}; use one of {', '.join(sorted(classes))}")
    cls = classes[cfg.type]
    params = dict(cfg.params)
    if cfg.type == "hybrid":
        terms = params.pop("terms", None)
        if not isinstance(terms, list) or not terms:
            raise ConfigError(f"{where}.params.terms: give a list of {{type, params, weight}} objectives to add up")
        built = []
        for i, term in enumerate(terms):
            if not isinstance(term, dict) or "weight" not in term or not isinstance(term.get("source", 0), int):
                raise ConfigError(
                    f"{where}.params.terms.{i}: write {{type: NAME, params: {{...}}, weight: W}} "
                    "(and source: N, an index into teachers:, when there are several teachers)"
                )
            sub = ObjectiveConfig.model_validate({k: v for k, v in term.items() if k not in ("weight", "source")})
            sub_objective = build_objective(sub, tokenizer, f"{where}.params.terms.{i}")
            built.append((sub_objective, float(term["weight"]), int(term.get("source", 0))))
        _check_params(cls, params, f"{where}.params", positional=1)
        return cls(built, **params)
    _check_params(cls, params, f"{where}.params")
    if "tokenizer" in inspect.signature(cls.__init__).parameters:
        params["tokenizer"] = tokenizer
    try:
        return cls(**params)
    except TypeError as exc:
        raise ConfigError(f"{where}.params: {exc}") from None


def _check_teacher(cfg: Any, where: str) -> None:
    if cfg.type in TEACHER_CLASSES:
        cls = _provider(TEACHER_CLASSES[cfg.type])
        _check_params(cls, getattr(cfg, "params", {}), f"{where}.params", positional=1)
    if hasattr(cfg, "api_key_env"):
        _api_key(cfg, where)
    for attr in ("verifier", "judge", "teacher"):
        child = getattr(cfg, attr, None)
        if child is not None and hasattr(child, "type"):
            _check_teacher(child, f"{where}.{attr}")
    for i, w in enumerate(getattr(cfg, "teachers", None) or []):
        _check_teacher(w.teacher, f"{where}.teachers.{i}.teacher")


def check_config(cfg: RunConfig) -> Any:
    """Every check that needs no model; returns the built objective. Raises ConfigError."""
    objective = build_objective(cfg.objective)
    if cfg.student.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"student.device: {cfg.student.device} asked for, but torch sees no GPU; use auto or cpu")
    kinds = tuple(getattr(objective, "feedback_kinds", ()))
    teachers = cfg.teacher_list()
    if not teachers:
        if kinds:
            raise ConfigError(
                f"teacher: objective {cfg.objective.type!r} reads {' or '.join(kinds)} feedback; add a "
                f"`teacher:` section (for example type: {_teacher_for(kinds[0])})"
            )
        if cfg.eval.metric == "teacher_score":
            raise ConfigError("eval.metric: teacher_score needs a `teacher:`; use metric: accuracy")
        return objective
    where = ["teacher"] if cfg.teachers is None else [f"teachers.{i}" for i in range(len(teachers))]
    for teacher, at in zip(teachers, where):
        _check_teacher(teacher, at)
    sources = getattr(objective, "feedback_sources", 1)
    if sources != len(teachers):
        raise ConfigError(
            f"objective {cfg.objective.type!r} reads {sources} feedback source(s) but {len(teachers)} teacher(s) "
            "are given; list one teacher per source under `teachers:` (a hybrid term's `source` indexes it)"
        )
    terms = getattr(objective, "terms", None) or [(objective, 1.0, 0)]
    for i, (term, _, source) in enumerate(terms):
        term_kinds = tuple(getattr(term, "feedback_kinds", ()))
        given = FEEDBACK_KIND[teachers[source].type]
        if term_kinds and given not in term_kinds:
            at = f"objective.params.terms.{i}" if term is not objective else f"objective {cfg.objective.type!r}"
            raise ConfigError(
                f"{at}: {type(term).__name__} reads {' or '.join(term_kinds)} feedback but {where[source]} "
                f"(type {teachers[source].type!r}) returns {given}; pick a teacher that returns {term_kinds[0]} "
                f"(for example type: {_teacher_for(term_kinds[0])}) or another objective"
            )
    if cfg.data.task is not None:
        from opd_sdk.tasks import get_task

        get_task(cfg.data.task)
    if cfg.data.path is not None and not os.path.exists(cfg.data.path):
        raise ConfigError(f"data.path: {cfg.data.path} does not exist; give a JSONL file with one prompt a line")
    if cfg.data.eval_path is not None and not os.path.exists(cfg.data.eval_path):
        raise ConfigError(f"data.eval_path: {cfg.data.eval_path} does not exist")
    return objective


def _teacher_for(kind: str) -> str:
    return next(t for t, k in FEEDBACK_KIND.items() if k == kind)
