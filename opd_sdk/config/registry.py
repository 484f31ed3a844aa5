"""Config `type` -> what builds it, for teachers and objectives, and the checks that need no model.

- Teachers: `opd_sdk.config.teachers` collects each type's declaration (the
  provider's parameter model, feedback kind, local or remote, factory);
  `TEACHERS` maps the YAML `type:` to it and `build_teacher` builds one.
- Objectives: `opd_sdk.objectives.OBJECTIVES` maps a name to its class; the
  class declares the feedback kinds it reads (`feedback_kinds`) and its
  parameters (`params_model`, the config's `params`, checked by
  `params_problems`), and `from_params` builds it.

`check_config(cfg)` runs every check that needs no model weights and reports
all problems at once, each as `yaml.path: what is wrong; how to fix it`. The
CLI runs it for `--check` and before `opd train` loads anything; what it read
(the prompts) comes back in a `Checked`, so a run reads nothing twice.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from opd_sdk.config.data import load_data
from opd_sdk.config.run import (
    InvalidConfig,
    ObjectiveConfig,
    RunConfig,
    did_you_mean,
    load_config,
)
from opd_sdk.config.teachers import TEACHERS, BuildContext, SelfDistillTeacherConfig, build_teacher
from opd_sdk.data import PromptItem
from opd_sdk.errors import ConfigError
from opd_sdk.objectives import OBJECTIVES
from opd_sdk.objectives.base import Composite, Objective
from opd_sdk.objectives.params import ObjectiveContext
from opd_sdk.parallel.distributed import (
    fsdp_requested,
    launch_problems,
    launched_world_size,
)

__all__ = [
    "TEACHERS", "BuildContext", "Checked", "build_objective", "build_teacher", "check_config", "feedback_kind",
    "params_problems",
]


def feedback_kind(teacher_type: str) -> str:
    """What a teacher `type:` returns: score, preference, reference or token_logprobs."""
    return TEACHERS[teacher_type].feedback


def _teacher_for(kind: str) -> str:
    """A teacher type that returns `kind` (for error messages)."""
    return next(name for name, model in TEACHERS.items() if model.feedback == kind)


def build_objective(cfg: ObjectiveConfig, tokenizer: Any = None, where: str = "objective") -> Any:
    """The objective `cfg.type`, its `cfg.params` checked against the objective's declared
    `params_model` (cheap: no model copies yet); raises ConfigError naming each bad parameter
    by YAML path.

    `tokenizer`: the student's, for the objectives that encode text (SFT, SPIN);
    `check_config` builds them with None, which their constructors only store.
    A `hybrid`'s terms are objective configs of their own, built here through
    `ObjectiveContext.build` (a term's `source` indexes the run's `teachers:` list).
    """
    if cfg.type not in OBJECTIVES:
        close = did_you_mean(cfg.type, sorted(OBJECTIVES))
        hint = f"did you mean {close!r}? " if close else ""
        raise ConfigError(f"{where}.type: unknown objective {cfg.type!r}; {hint}use one of {', '.join(sorted(OBJECTIVES))}")
    cls = OBJECTIVES[cfg.type]
    problems = params_problems(cls.params_model, cfg.params, f"{where}.params", cls.__name__)
    if problems:
        raise ConfigError("\n  ".join(problems))

    def build_term(kind: str, params: Any, at: str) -> Any:
        return build_objective(ObjectiveConfig(type=kind, params=dict(params)), tokenizer, f"{where}.params.{at}")

    try:
        return cls.from_params(cls.params_model.model_validate(cfg.params), ObjectiveContext(tokenizer, build_term))
    except ConfigError as exc:  # a term's error already names its path; the objective's own check does not
        if str(exc).startswith(f"{where}."):
            raise
        raise ConfigError(f"{where}.params: {exc}") from None


def params_problems(model: type[BaseModel], params: dict[str, Any], where: str, owner: str) -> list[str]:
    """`params` checked against a declared parameter model: one line per unknown name (with a
    "did you mean") or bad value, each named by YAML path (`teachers.1.params.on_mismatch`)."""
    try:
        model.model_validate(params)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_input=False, include_url=False):
            loc = [str(part) for part in err["loc"]]
            at = ".".join([where, *loc])
            if err["type"] == "extra_forbidden" and len(loc) == 1:
                names = list(model.model_fields)
                close = did_you_mean(loc[0], names)
                hint = f"did you mean `{close}`? " if close else ""
                problems.append(f"{at}: unknown parameter for {owner}; {hint}valid: {', '.join(names)}")
            elif err["type"] in ("extra_forbidden", "missing"):  # inside a parameter (a hybrid's term)
                problems.append(f"{at}: " + ("unknown field: remove it" if err["type"] == "extra_forbidden"
                                             else "required field is missing: add it"))
            else:
                problems.append(f"{at}: {err['msg'].removeprefix('Value error, ')}")
        return problems
    return []


def _teacher_problems(cfg: Any, where: str) -> list[str]:
    """Parameters and API keys of a teacher and, for a composition, of its children."""
    problems = params_problems(cfg.provider_params, cfg.params, f"{where}.params", cfg.provider.__name__)
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


def _gad_paths(cfg: Any, where: str) -> list[str]:
    """YAML paths of the gad teachers in a teacher tree."""
    found = [where] if cfg.type == "gad" else []
    return found + [p for suffix, child in cfg.children() for p in _gad_paths(child, f"{where}.{suffix}")]


def _gad_problems(cfg: RunConfig, teachers: list[Any], where: list[str]) -> list[str]:
    """A gad discriminator learns from every batch it scores: it cannot be asked ahead of the step
    (max_staleness), nor grade held-out answers (it would learn from them, and its scale moves)."""
    paths = [p for teacher, at in zip(teachers, where) for p in _gad_paths(teacher, at)]
    problems = []
    if paths and cfg.rollout.max_staleness >= 1:
        problems.append(f"rollout.max_staleness: {paths[0]} (gad) learns from every batch it scores, so it cannot be "
                        "asked ahead of the step; set rollout.max_staleness: 0")
    if paths and cfg.eval.metric == "teacher_score" and teachers[0].type == "gad":
        problems.append(f"eval.metric: teacher_score would ask {paths[0]} (gad), whose discriminator learns from what "
                        "it scores and whose scale moves every step; use metric: accuracy (held-out answers), and pick "
                        "checkpoints by it")
    return problems


def _objective_problems(cfg: RunConfig, objective: Objective) -> list[str]:
    """Feedback sources and kinds the objective reads against the teachers given; group size."""
    problems: list[str] = []
    kinds = objective.feedback_kinds
    teachers = cfg.teacher_list()
    where = ["teacher"] if cfg.teachers is None else [f"teachers.{i}" for i in range(len(teachers))]
    if not teachers and kinds:
        problems.append(
            f"teacher: objective {cfg.objective.type!r} reads {' or '.join(kinds)} feedback; add a "
            f"`teacher:` section (for example type: {_teacher_for(kinds[0])})"
        )
    sources = objective.feedback_sources if isinstance(objective, Composite) else 1
    if teachers and sources != len(teachers):
        problems.append(
            f"objective {cfg.objective.type!r} reads {sources} feedback source(s) but {len(teachers)} teacher(s) "
            "are given; list one teacher per source under `teachers:` (a hybrid term's `source` indexes it)"
        )
    terms = objective.terms if isinstance(objective, Composite) else [(objective, 1.0, 0)]
    for i, (term, _, source) in enumerate(terms):
        at = f"objective.params.terms.{i}" if term is not objective else f"objective {cfg.objective.type!r}"
        term_kinds = term.feedback_kinds
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


def _objective_without_bad_params(cfg: ObjectiveConfig) -> Any:
    """The objective built with the parameters that failed left out (their defaults), for the checks
    that need one; None when it still does not build (an unknown type, a bad hybrid term)."""
    cls = OBJECTIVES.get(cfg.type)
    if cls is None:
        return None
    try:
        cls.params_model.model_validate(cfg.params)
        return None  # the parameters are fine: the objective's own check failed
    except ValidationError as exc:
        bad = {str(err["loc"][0]) for err in exc.errors(include_input=False) if err["loc"]}
    try:
        return build_objective(ObjectiveConfig(type=cfg.type, params={k: v for k, v in cfg.params.items() if k not in bad}))
    except ConfigError:
        return None


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


Prompts = tuple[list[PromptItem], list[PromptItem]]


def _data_problems(cfg: RunConfig) -> tuple[list[str], Prompts | None]:
    """Read and validate the prompts (task or JSONL), size the held-out split, check answers for
    accuracy. Returns (problems, (train, held-out) as read; None when not read)."""
    if cfg.data.hf_dataset is not None:
        return [], None  # read at train time (a download); `datasets` reports its own errors
    for field in ("path", "eval_path"):
        value = getattr(cfg.data, field)
        if value is not None and not Path(value).is_file():
            return [
                f"data.{field}: {value} does not exist; give a JSONL file with one {{\"{cfg.data.prompt_field}\": ...}} "
                "a line (relative paths are read relative to the config file)"
            ], None
    try:
        train, held = load_data(cfg.data, seed=cfg.seed)
    except ConfigError as exc:
        msg = str(exc)
        return [msg if msg.startswith("data") else f"data: {msg}"], None
    problems = []
    if cfg.eval.metric == "accuracy" and any(it.answer is None for it in held):
        missing = sum(it.answer is None for it in held)
        problems.append(
            f"eval.metric: accuracy needs an answer for every held-out prompt, and {missing} of {len(held)} have "
            f"none (field `{cfg.data.answer_field}`); add answers or set eval.metric: teacher_score"
        )
    return problems, (train, held)


def _needs_student(cfg: Any) -> bool:
    return cfg.needs_student() or any(_needs_student(child) for _, child in cfg.children())


def _build_problems(cfg: Any, where: str) -> list[str]:
    """What a teacher's constructor refuses (a judge scale [10, 0], G-Eval outside 0..9, ...), found by
    building it now, with no model and no call made; a tree with a teacher that needs the student's model
    or tokenizer (`needs_student`: self_distill, gad, logprob sending token ids) is checked child by child
    and not built (children first, so a problem names its own path). Bad parameters are
    `_teacher_problems`' to report."""
    children = [p for suffix, child in cfg.children() for p in _build_problems(child, f"{where}.{suffix}")]
    if children or _needs_student(cfg):  # each child's problem named by its own path
        return children
    try:
        build_teacher(cfg, BuildContext(checking=True), where)
    except ConfigError as exc:
        msg = str(exc)
        if msg.startswith(where):
            return [msg]
        return [f"{where}.{msg}" if re.match(r"^[a-z_]+: ", msg) else f"{where}: {msg}"]
    except ValidationError:
        pass
    return []


def _lora_problems(cfg: RunConfig) -> list[str]:
    if cfg.student.lora is not None and importlib.util.find_spec("peft") is None:
        return [("student.lora: LoRA needs the peft package, which is not installed; pip install 'opd-sdk[peft]' "
                 "(or pip install peft), or remove student.lora to train every weight")]
    return []


def _output_problems(cfg: RunConfig) -> list[str]:
    """output_dir (and a collector.cache outside it) must be a folder this process can create and write."""
    problems = []
    for name, path in (("output_dir", Path(cfg.output_dir)), ("collector.cache", cfg.cache_path())):
        if path is None or (name == "collector.cache" and cfg.collector.cache is None):
            continue
        target = path if name == "output_dir" else path.parent
        existing = next((p for p in [target, *target.parents] if p.exists()), None)
        if existing is None:
            continue
        if not existing.is_dir():
            problems.append(f"{name}: {existing} is a file, not a folder; choose another {name} (--set {name}=...)")
        elif not os.access(existing, os.W_OK | os.X_OK):
            problems.append(f"{name}: {existing} is read-only for this user, so {path} cannot be written; choose a "
                            f"folder you can write (--set {name}=...)")
    return problems


def check_prompt_lengths(cfg: RunConfig, data: Prompts, folder: str | Path | None = None
                         ) -> tuple[list[str], Prompts, bool, list[str]]:
    """Prompts against the student's context (`opd_sdk.config.lengths`): (problems, the prompts to train
    and evaluate on, whether they were measured, notes). The tokenizer and config.json are read from
    `folder`, default the student's folder when it is on this machine already; without one nothing is
    measured (the run measures them once the student is there, before its weights load)."""
    from opd_sdk.config.lengths import (
        fit_prompts,
        local_student_folder,
        student_context,
        student_tokenizer,
    )

    folder = folder if folder is not None else local_student_folder(cfg.student.model)
    if folder is None:
        return [], data, False, []
    problems, train, held, note = fit_prompts(cfg, student_tokenizer(folder), student_context(folder), data)
    return problems, (train, held), True, [note] if note else []


def _budget_problems(cfg: RunConfig) -> list[str]:
    c = cfg.collector
    if c.budget_usd is not None and not (c.price_per_1k_prompt_tokens or c.price_per_1k_completion_tokens):
        return [
            "collector.budget_usd: a budget needs prices to count against; set collector.price_per_1k_prompt_tokens "
            "and collector.price_per_1k_completion_tokens (your provider's price per 1,000 tokens)"
        ]
    return []


def load_and_check(path: str, overrides: list[str] | None = None) -> tuple[RunConfig, Checked]:
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
            # the checks ran on the config without the bad fields: a problem under one already reported is not new
            rest = [line for line in str(more).removeprefix("invalid config:\n  ").split("\n  ")
                    if not _under(line.split(":", 1)[0], exc.reported)]
            if rest:
                raise ConfigError("\n  ".join([str(exc), *rest])) from None
        raise
    return cfg, check_config(cfg)


def _under(path: str, reported: tuple[str, ...]) -> bool:
    """True when YAML path `path` is one of `reported` or inside one, or contains one."""
    return any(path == r or path.startswith(r + ".") or r.startswith(path + ".") for r in reported if r)


@dataclass
class Checked:
    """What `check_config` built and read, for the run to reuse instead of reading it again.

    objective: built without a tokenizer (the run builds its own with the student's).
    data: (train, held-out) prompts as `load_data` returned them; None when the
        check did not read them (an `hf_dataset`: a download, read at train time).
    """

    objective: Any
    data: Prompts | None
    lengths_checked: bool = False  # prompts measured against the student's context (`opd_sdk.config.lengths`)
    notes: list[str] = dataclasses.field(default_factory=list)  # what the run should say (prompts left out by data.too_long)


def check_config(cfg: RunConfig) -> Checked:
    """Every check that needs no model weights; returns what it built and read (`Checked`).

    Raises one ConfigError listing every problem found, one line each.
    """
    problems: list[str] = []
    objective = None
    try:
        objective = build_objective(cfg.objective)
    except ConfigError as exc:
        problems.append(str(exc))
        objective = _objective_without_bad_params(cfg.objective)  # its other checks (group size) still run
    if cfg.student.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            problems.append(f"student.device: {cfg.student.device} asked for, but torch sees no GPU; use auto or cpu")
    teachers = cfg.teacher_list()
    where = ["teacher"] if cfg.teachers is None else [f"teachers.{i}" for i in range(len(teachers))]
    for teacher, at in zip(teachers, where):  # no teacher: where is ["teacher"], teachers []
        problems += _teacher_problems(teacher, at)
        problems += [
            f"rollout.max_staleness: {path} (self_distill in live or ema mode) follows the student's weights, so it "
            "cannot be asked ahead of the step that changes them; set rollout.max_staleness: 0, or mode: frozen"
            for path in (_follows_student(teacher, at) if cfg.rollout.max_staleness >= 1 else [])
        ]
    problems += _gad_problems(cfg, teachers, where)
    if objective is not None:
        problems += _objective_problems(cfg, objective)
    if not teachers and cfg.eval.metric == "teacher_score":
        problems.append("eval.metric: teacher_score needs a `teacher:`; use metric: accuracy")
    problems += [p for t, at in zip(teachers, where) for p in _build_problems(t, at)]
    data_problems, data = _data_problems(cfg)
    student_problems = _student_problems(cfg)
    problems += student_problems + data_problems + _budget_problems(cfg) + _lora_problems(cfg) + _output_problems(cfg)
    lengths_checked, notes = False, []
    if data is not None and not student_problems and not data_problems:
        length_problems, data, lengths_checked, notes = check_prompt_lengths(cfg, data)
        problems += length_problems
    problems += launch_problems(  # this launch: processes (torchrun / accelerate launch) and FSDP
        world_size=launched_world_size(), fsdp=fsdp_requested(), prompts_per_step=cfg.rollout.prompts_per_step,
        max_staleness=cfg.rollout.max_staleness, eval_every=cfg.eval.every or 0, engine=cfg.rollout.engine,
        objective=objective,
    )
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(dict.fromkeys(problems)))  # each once, in order
    return Checked(objective, data, lengths_checked, notes)
