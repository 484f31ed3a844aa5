"""Config `type` -> what builds it, for teachers and objectives, and the checks that need no model.

- Teachers: `opd_sdk.config.teachers` declares each type once (config model,
  provider, feedback kind, local or remote, factory); `TEACHERS` maps the
  YAML `type:` to that declaration and `build_teacher` builds one.
- Objectives: `opd_sdk.objectives.OBJECTIVES` maps a name to its class; the
  class declares the feedback kinds it reads (`feedback_kinds`), and its
  constructor's keyword arguments are the config's `params`.

`check_config(cfg)` runs every check that needs no model weights and reports
all problems at once, each as `yaml.path: what is wrong; how to fix it`. The
CLI runs it for `--check` and before `opd train` loads anything.
"""

from __future__ import annotations

import inspect
import os
import typing
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from opd_sdk.config.data import load_data
from opd_sdk.config.run import (
    InvalidConfig,
    ObjectiveConfig,
    RunConfig,
    did_you_mean,
    load_config,
)
from opd_sdk.config.teachers import TEACHERS, BuildContext, SelfDistillTeacherConfig, build_teacher
from opd_sdk.errors import ConfigError
from opd_sdk.parallel.distributed import (
    fsdp_requested,
    launch_problems,
    launched_world_size,
)

__all__ = ["TEACHERS", "BuildContext", "build_objective", "build_teacher", "check_config", "feedback_kind"]


def feedback_kind(teacher_type: str) -> str:
    """What a teacher `type:` returns: score, preference, reference or token_logprobs."""
    return TEACHERS[teacher_type].feedback


def _teacher_for(kind: str) -> str:
    """A teacher type that returns `kind` (for error messages)."""
    return next(name for name, model in TEACHERS.items() if model.feedback == kind)


def _objective_classes() -> dict[str, type]:
    from opd_sdk.objectives import OBJECTIVES

    return OBJECTIVES


def _check_params(cls: type, params: dict[str, Any], where: str, positional: int = 0) -> None:
    """Raise a ConfigError listing every parameter the constructor does not take or whose value has the wrong type."""
    problems = _param_problems(cls, params, where, positional)
    if problems:
        raise ConfigError("\n  ".join(problems))


def build_objective(cfg: ObjectiveConfig, tokenizer: Any = None, where: str = "objective") -> Any:
    """The objective `cfg.type` with `cfg.params` as keyword arguments (cheap: no model copies yet).

    Objectives that take the student's tokenizer (SFT, SPIN) get `tokenizer`;
    `check_config` builds them with None, which their constructors only store.
    `hybrid` takes params {terms: [{type, params, weight, source}, ...]}; a
    term's `source` (default 0) indexes the run's `teachers:` list.
    """
    classes = _objective_classes()
    if cfg.type not in classes:
        close = did_you_mean(cfg.type, sorted(classes))
        hint = f"did you mean {close!r}? " if close else ""
        raise ConfigError(f"{where}.type: unknown objective {cfg.type!r}; {hint}use one of {', '.join(sorted(classes))}")
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
    except (TypeError, ValueError) as exc:  # ConfigError is a ValueError: the objective's own check
        raise ConfigError(f"{where}.params: {exc}") from None


def _param_problems(cls: type, params: dict[str, Any], where: str, positional: int = 0) -> list[str]:
    """Keyword arguments `cls` does not take (with a "did you mean") and values of the wrong type,
    one line each, named by YAML path (`teachers.1.params.on_mismatch`). `positional`: leading
    constructor arguments the config supplies itself (a teacher's model)."""
    sig = inspect.signature(cls.__init__)
    names = [
        n for n, p in sig.parameters.items() if n not in ("self", "tokenizer") and p.kind is not p.VAR_POSITIONAL
    ][positional:]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    problems = []
    for name in params:
        if name not in names and not takes_any:
            close = did_you_mean(name, names)
            hint = f"did you mean `{close}`? " if close else ""
            problems.append(f"{where}.{name}: unknown parameter for {cls.__name__}; {hint}valid: {', '.join(names)}")
    annotations = getattr(cls.__init__, "__annotations__", {})
    namespace = dict(vars(inspect.getmodule(cls)))
    for name, value in params.items():
        hint = annotations.get(name)
        if hint is None:
            continue
        try:
            if isinstance(hint, str):
                hint = eval(hint, dict(vars(typing)), namespace)  # noqa: S307 - the provider's own annotation
            TypeAdapter(hint).validate_python(value)
        except ValidationError as exc:
            err = exc.errors(include_input=False, include_url=False)[0]
            problems.append(f"{where}.{name}: {err['msg']}")
        except Exception:  # an annotation pydantic cannot check here (a client object, a callable): skip
            continue
    return problems


def _teacher_problems(cfg: Any, where: str) -> list[str]:
    """Parameters and API keys of a teacher and, for a composition, of its children."""
    problems: list[str] = []
    if "params" in type(cfg).model_fields:
        problems += _param_problems(cfg.provider_class(), cfg.params, f"{where}.params", positional=1)
    if hasattr(cfg, "api_key"):
        try:
            cfg.api_key(where)
        except ConfigError as exc:
            problems.append(str(exc))
    for suffix, child in cfg.children():
        problems += _teacher_problems(child, f"{where}.{suffix}")
    return problems


def _follows_student(cfg: Any, where: str) -> list[str]:
    """YAML paths of the teachers in a teacher tree that follow the student's weights (self_distill, live or
    ema): the Trainer refuses them with max_staleness >= 1 (`opd_sdk.train.collect.check_collectors`)."""
    if isinstance(cfg, SelfDistillTeacherConfig) and cfg.mode != "frozen":
        return [where]
    return [found for suffix, child in cfg.children() for found in _follows_student(child, f"{where}.{suffix}")]


def _objective_problems(cfg: RunConfig, objective: Any) -> list[str]:
    """Feedback sources and kinds the objective reads against the teachers given; group size."""
    problems: list[str] = []
    kinds = tuple(getattr(objective, "feedback_kinds", ()))
    teachers = cfg.teacher_list()
    where = ["teacher"] if cfg.teachers is None else [f"teachers.{i}" for i in range(len(teachers))]
    if not teachers and kinds:
        problems.append(
            f"teacher: objective {cfg.objective.type!r} reads {' or '.join(kinds)} feedback; add a "
            f"`teacher:` section (for example type: {_teacher_for(kinds[0])})"
        )
    sources = getattr(objective, "feedback_sources", 1)
    if teachers and sources != len(teachers):
        problems.append(
            f"objective {cfg.objective.type!r} reads {sources} feedback source(s) but {len(teachers)} teacher(s) "
            "are given; list one teacher per source under `teachers:` (a hybrid term's `source` indexes it)"
        )
    terms = getattr(objective, "terms", None) or [(objective, 1.0, 0)]
    for i, (term, _, source) in enumerate(terms):
        at = f"objective.params.terms.{i}" if term is not objective else f"objective {cfg.objective.type!r}"
        term_kinds = tuple(getattr(term, "feedback_kinds", ()))
        if teachers and source < len(teachers) and term_kinds:
            given = feedback_kind(teachers[source].type)
            if given not in term_kinds:
                problems.append(
                    f"{at}: {type(term).__name__} reads {' or '.join(term_kinds)} feedback but {where[source]} "
                    f"(type {teachers[source].type!r}) returns {given}; pick a teacher that returns "
                    f"{term_kinds[0]} (for example type: {_teacher_for(term_kinds[0])}) or another objective"
                )
        if cfg.rollout.group_size < term.min_group_size:
            problems.append(
                f"rollout.group_size: {type(term).__name__} compares the samples of a prompt with each other, "
                f"so group_size {cfg.rollout.group_size} gives no learning signal; set rollout.group_size: 4 ({term.min_group_size} at least)"
            )
    return problems


def _student_problems(cfg: RunConfig) -> list[str]:
    """student.model is the offline SmolLM2, an existing folder, or a Hugging Face id that can be fetched."""
    from opd_sdk.models import smollm2_gguf_path

    name = cfg.student.model
    if name.lower() in {"smollm2", "smollm2-135m-instruct", "smollm2-135m"}:
        try:
            smollm2_gguf_path()
        except ConfigError as exc:
            return [f"student.model: {exc}"]
        return []
    path = Path(name).expanduser()
    if path.exists():
        return [] if (path / "config.json").exists() else [f"student.model: {name} has no config.json; give a Hugging Face model folder"]
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") != 1:
        return [
            f"student.model: {name} does not exist; give an existing model folder (relative paths are read "
            "relative to the config file), a Hugging Face id like owner/name, or smollm2"
        ]
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            return [f"student.model: {name} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; download it first or give a local folder"]
    return []


def _data_problems(cfg: RunConfig) -> list[str]:
    """Read and validate the prompts (task or JSONL), size the held-out split, check answers for accuracy."""
    if cfg.data.hf_dataset is not None:
        return []  # read at train time (a download); `datasets` reports its own errors
    for field in ("path", "eval_path"):
        value = getattr(cfg.data, field)
        if value is not None and not Path(value).is_file():
            return [
                f"data.{field}: {value} does not exist; give a JSONL file with one {{\"{cfg.data.prompt_field}\": ...}} "
                "a line (relative paths are read relative to the config file)"
            ]
    try:
        train, held = load_data(cfg.data, seed=cfg.seed)
    except ConfigError as exc:
        msg = str(exc)
        return [msg if msg.startswith("data") else f"data: {msg}"]
    problems = []
    if cfg.eval.metric == "accuracy" and any(it.answer is None for it in held):
        missing = sum(it.answer is None for it in held)
        problems.append(
            f"eval.metric: accuracy needs an answer for every held-out prompt, and {missing} of {len(held)} have "
            f"none (field `{cfg.data.answer_field}`); add answers or set eval.metric: teacher_score"
        )
    return problems


def _budget_problems(cfg: RunConfig) -> list[str]:
    c = cfg.collector
    if c.budget_usd is not None and not (c.price_per_1k_prompt_tokens or c.price_per_1k_completion_tokens):
        return [
            "collector.budget_usd: a budget needs prices to count against; set collector.price_per_1k_prompt_tokens "
            "and collector.price_per_1k_completion_tokens (your provider's price per 1,000 tokens)"
        ]
    return []


def load_and_check(path: str, overrides: list[str] | None = None) -> RunConfig:
    """`load_config` then `check_config`, reporting every problem at once: unknown fields do not
    hide the checks of the rest (they run on the config without them). Raises ConfigError."""
    try:
        cfg = load_config(path, overrides)
    except InvalidConfig as exc:
        if exc.partial is None:
            raise
        try:
            check_config(exc.partial)
        except ConfigError as more:
            rest = str(more).removeprefix("invalid config:\n  ")
            raise ConfigError(f"{exc}\n  {rest}") from None
        raise
    check_config(cfg)
    return cfg


def check_config(cfg: RunConfig) -> Any:
    """Every check that needs no model weights; returns the built objective.

    Raises one ConfigError listing every problem found, one line each.
    """
    problems: list[str] = []
    objective = None
    try:
        objective = build_objective(cfg.objective)
    except ConfigError as exc:
        problems.append(str(exc))
    if cfg.student.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            problems.append(f"student.device: {cfg.student.device} asked for, but torch sees no GPU; use auto or cpu")
    teachers = cfg.teacher_list()
    where = ["teacher"] if cfg.teachers is None else [f"teachers.{i}" for i in range(len(teachers))]
    for teacher, at in zip(teachers, where):
        problems += _teacher_problems(teacher, at)
        problems += [
            f"rollout.max_staleness: {path} (self_distill in live or ema mode) follows the student's weights, so it "
            "cannot be asked ahead of the step that changes them; set rollout.max_staleness: 0, or mode: frozen"
            for path in (_follows_student(teacher, at) if cfg.rollout.max_staleness >= 1 else [])
        ]
    if objective is not None:
        problems += _objective_problems(cfg, objective)
    if not teachers and cfg.eval.metric == "teacher_score":
        problems.append("eval.metric: teacher_score needs a `teacher:`; use metric: accuracy")
    problems += _student_problems(cfg) + _data_problems(cfg) + _budget_problems(cfg)
    problems += launch_problems(  # this launch: processes (torchrun / accelerate launch) and FSDP
        world_size=launched_world_size(), fsdp=fsdp_requested(), prompts_per_step=cfg.rollout.prompts_per_step,
        max_staleness=cfg.rollout.max_staleness, eval_every=cfg.eval.every or 0, engine=cfg.rollout.engine,
        objective=objective,
    )
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return objective
