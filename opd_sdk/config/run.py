"""The run configuration: pydantic models read from YAML, checked before any model loads.

`load_config(path, overrides)` reads a YAML file, applies `--set a.b=value`
overrides to the raw mapping, and validates the result. Every error is a
`ConfigError` whose lines name the field (`teacher.api_key_env`) and say how
to fix it; values are never echoed back, so a secret pasted into the wrong
field does not reach a terminal or a log.

API keys come from the environment only: a teacher names the variable in
`api_key_env`; a literal `api_key` in the YAML is refused. Teacher sections
are collected in `opd_sdk.config.teachers`, one class per `type:`, from the
parameters each provider declares.
"""

from __future__ import annotations

import copy
import difflib
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from opd_sdk.config.settings import LoopSettings, OptimizerSettings, RolloutSettings
from opd_sdk.config.settings import _Settings as _Strict
from opd_sdk.config.teachers import (  # the teacher sections, one declaration each
    TEACHERS,
    TeacherConfig,
)
from opd_sdk.constants import (
    BATCH_DISCOUNT,
    BATCH_POLL_S,
    DEFAULT_MAX_CONCURRENCY,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT_S,
)
from opd_sdk.errors import ConfigError


class LoraConfig(_Strict):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | str = "all-linear"


class StudentConfig(_Strict):
    """model: a Hugging Face id, a local folder, or `smollm2` (offline SmolLM2-135M-Instruct).

    device: "auto" (the GPU when torch sees one, else the CPU), "cpu", "cuda" or "cuda:N".
    precision: the Trainer's; "auto" is bf16 autocast on a GPU and fp32 on the CPU.
    dtype: the weights' storage type (float32 keeps an fp32 master copy under bf16 autocast).
    """

    model: str = Field(min_length=1)
    lora: LoraConfig | None = None
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    dtype: Literal["float32", "bfloat16"] = "float32"
    gradient_checkpointing: bool = False


class DataConfig(_Strict):
    """Exactly one source: `path` (JSONL), `hf_dataset` (+ `split`), or `task` (built-in, opd_sdk.tasks).

    too_long: what to do with a prompt that cannot fit the student's context together with its
    max_new_tokens: "error" (the default: reported before any weights load, with its file and
    line) or "skip" (left out, and counted in the run's log)."""

    path: str | None = None
    hf_dataset: str | None = None
    hf_config: str | None = None
    split: str = "train"
    eval_split: str | None = None
    eval_path: str | None = None
    task: str | None = None
    task_params: dict[str, Any] = Field(default_factory=dict)
    prompt_field: str = "prompt"
    privileged_field: str | None = "privileged"
    answer_field: str | None = "answer"
    limit: int | None = Field(None, gt=0)
    eval_size: int = Field(64, gt=0)
    # a prompt that cannot fit the student's context with its max_new_tokens: "error" (reported by
    # --check with its file and line) or "skip" (left out, counted); opd_sdk.config.lengths
    too_long: Literal["error", "skip"] = "error"

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        given = [n for n in ("path", "hf_dataset", "task") if getattr(self, n)]
        if len(given) != 1:
            raise ValueError(
                "set exactly one data source: `path: prompts.jsonl`, `hf_dataset: owner/name` or "
                f"`task: NAME` (a built-in task); got {given or 'none'}"
            )
        return self


class ObjectiveConfig(_Strict):
    """type: a name in opd_sdk.objectives.OBJECTIVES; params: checked against that objective's declared
    `params_model` (by `opd_sdk.config.registry.build_objective`)."""

    type: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)


# The optimizer:, rollout: sections and the loop fields are declared once, in settings.py.
OptimizerConfig = OptimizerSettings
RolloutConfig = RolloutSettings


class CollectorConfig(_Strict):
    """Teacher-call limits. `cache` defaults to OUTPUT_DIR/feedback_cache.sqlite."""

    max_concurrency: int = Field(DEFAULT_MAX_CONCURRENCY, gt=0)
    rpm: float | None = Field(None, gt=0)
    tpm: float | None = Field(None, gt=0)
    timeout: float = Field(DEFAULT_TIMEOUT_S, gt=0)
    max_retries: int = Field(DEFAULT_MAX_RETRIES, ge=0)
    cache: str | None = None
    no_cache: bool = False
    budget_usd: float | None = Field(None, gt=0)
    price_per_1k_prompt_tokens: float = Field(0.0, ge=0)
    price_per_1k_completion_tokens: float = Field(0.0, ge=0)
    batch_discount: float = Field(BATCH_DISCOUNT, ge=0, lt=1)  # `opd collect --batch`: the Batch API's price cut
    batch_poll_s: tuple[float, float] = BATCH_POLL_S  # `opd collect --batch`: first, longest wait between polls


class LoggingConfig(_Strict):
    """metrics.jsonl is always written to output_dir; TensorBoard / W&B when asked and installed."""

    tensorboard: bool = False
    wandb_project: str | None = None
    progress: bool | None = None


class EvalConfig(_Strict):
    """Held-out evaluation: greedy accuracy with a verifier, else mean teacher score; `none` skips it
    (no answers to check and no teacher worth paying for a score: evaluate the saved final/ yourself)."""

    metric: Literal["accuracy", "teacher_score", "none"] = "accuracy"
    every: int | None = Field(None, gt=0)  # also evaluate every N training steps (logged as eval/<metric>)
    max_new_tokens: int = Field(128, gt=0)
    batch_size: int = Field(16, gt=0)

    @model_validator(mode="after")
    def _every_needs_a_metric(self) -> EvalConfig:
        if self.metric == "none" and self.every:
            raise ValueError("eval.every needs a metric; remove eval.every or set eval.metric: accuracy or "
                             "teacher_score")
        return self


class RunConfig(LoopSettings):
    """A whole run. Loop fields (steps, seed, save_every, max_no_signal_steps, ...) come from LoopSettings."""

    student: StudentConfig
    data: DataConfig
    objective: ObjectiveConfig
    teacher: TeacherConfig | None = None  # None: a teacher-free objective (SFT / SPIN on data answers)
    # Several teachers at once, for a hybrid objective whose terms name a `source` (an index here).
    teachers: list[TeacherConfig] | None = Field(None, min_length=1)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    collector: CollectorConfig = Field(default_factory=CollectorConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output_dir: str = "runs/opd"

    @model_validator(mode="after")
    def _one_teacher_field(self) -> "RunConfig":
        if self.teacher is not None and self.teachers is not None:
            raise ValueError("give `teacher:` (one) or `teachers:` (a list, one per hybrid source), not both")
        return self

    def teacher_list(self) -> list[Any]:
        """The run's teachers, in source order: [] for a teacher-free run."""
        return list(self.teachers) if self.teachers is not None else [self.teacher] if self.teacher is not None else []

    def cache_path(self) -> Path | None:
        if self.collector.no_cache:
            return None
        return Path(self.collector.cache or Path(self.output_dir) / "feedback_cache.sqlite")


# ---------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optimizer.lr=3e-6` -> (["optimizer", "lr"], "3e-6"); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: write --set key.sub=value, for example --set optimizer.lr=3e-6")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in parts):
        raise ConfigError(f"--set {text!r}: the key must be dotted field names, like rollout.group_size")
    return parts, yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each `a.b.c=value` in the raw mapping (creating mappings, indexing lists by number)."""
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = raw
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {text!r}: `{where}` is not an index of that list (0..{len(node) - 1})")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise ConfigError(f"--set {text!r}: `{'.'.join(parts[:i])}` is a value, not a section")
    return raw


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: `field.path: what is wrong (how to fix)`; never the value itself."""
    lines = []
    for err in exc.errors(include_input=False, include_url=False):
        loc = _field_path(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        kind = err["type"]
        if kind == "extra_forbidden":
            valid = _fields_at(err["loc"][:-1])
            close = did_you_mean(str(err["loc"][-1]), valid)
            msg = f"unknown field: did you mean `{close}`?" if close else "unknown field: remove it"
            msg += f" (valid here: {', '.join(valid)})" if valid else ""
        elif kind == "missing":
            msg = "required field is missing: add it"
        elif kind == "union_tag_invalid":
            tags = err.get("ctx", {}).get("expected_tags", "")
            msg = f"unknown type: use one of {tags}"
        elif kind == "union_tag_not_found":
            msg = "add `type:` naming which kind this is"
        lines.append(f"{loc or '<top>'}: {msg}")
    return "invalid config:\n  " + "\n  ".join(lines)


def _field_path(loc: tuple) -> str:
    """Drop the union tag pydantic inserts after a teacher field: teacher.judge.model -> teacher.model."""
    kept: list[str] = []
    expect_tag = False
    for part in loc:
        if expect_tag and part in _TEACHER_TAGS:
            expect_tag = False
            continue
        expect_tag = part in ("teacher", "verifier", "judge") or (kept == ["teachers"] and isinstance(part, int))
        kept.append(str(part))
    return ".".join(kept)


_TEACHER_TAGS = set(TEACHERS)


def did_you_mean(name: str, valid: list[str]) -> str | None:
    """The valid name closest to a misspelt one: swapped letters first (modle -> model), then difflib's."""
    swapped = [v for v in valid if sorted(v) == sorted(name)]
    close = swapped or difflib.get_close_matches(name, valid, n=1)
    return close[0] if close else None


def _fields_at(loc: tuple) -> list[str]:
    """The field names of the config section at pydantic location `loc` (for "did you mean")."""
    models: list[type[BaseModel]] = [RunConfig]
    for part in loc:
        if isinstance(part, int):
            continue
        if len(models) > 1 and part in TEACHERS:  # the union tag pydantic puts after a teacher field
            models = [TEACHERS[part]]
            continue
        field = models[0].model_fields.get(part) if len(models) == 1 else None
        if field is None:
            return []
        models = _models_in(field.annotation)
    return list(models[0].model_fields) if len(models) == 1 else []


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


class InvalidConfig(ConfigError):
    """A config that did not validate. partial: the same config without the fields that failed
    (their defaults instead; a section whose required field is missing left out), when that
    validates (None otherwise), so the checks that need a whole config still run and every
    problem is reported at once. reported: the YAML paths of the problems already reported."""

    def __init__(self, message: str, partial: "RunConfig | None" = None, reported: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.partial = partial
        self.reported = reported


MAX_DROP_ROUNDS = 4


def _drop(raw: dict, loc: tuple, missing: bool) -> bool:
    """Remove from `raw` the field a pydantic error at `loc` names (the last mapping key on the way,
    past list indexes of its value), or its section when the field is missing; False when that is
    the top level (nothing optional to drop)."""
    keys: list[tuple[Any, Any]] = []  # (container, key) along the path that exists in raw
    node: Any = raw
    for part in [int(p) if p.isdigit() else p for p in _field_path(loc).split(".") if p]:
        if (isinstance(node, dict) and part in node) or (
                isinstance(node, list) and isinstance(part, int) and part < len(node)):
            keys.append((node, part))
            node = node[part]
        else:
            break
    dict_keys = [(c, k) for c, k in keys if isinstance(c, dict)]
    if missing:  # the section that lacks it goes, unless that is the whole config
        dict_keys = dict_keys[:-1] if len(keys) == len(_field_path(loc).split(".")) else dict_keys
    if not dict_keys:
        return False
    container, key = dict_keys[-1]
    container.pop(key, None)
    return True


def _without_bad_fields(raw: dict, exc: ValidationError) -> "RunConfig | None":
    """`raw` validated again with every field that failed removed (`_drop`); None when it still fails."""
    stripped = copy.deepcopy(raw)
    for _ in range(MAX_DROP_ROUNDS):
        for err in exc.errors(include_input=False, include_url=False):
            if not _drop(stripped, err["loc"], err["type"] == "missing"):
                return None
        try:
            return RunConfig.model_validate(stripped)
        except ValidationError as again:
            exc = again
        except (KeyError, IndexError, TypeError):
            return None
    return None


def validate_config(raw: Any) -> RunConfig:
    """The RunConfig of a raw mapping; raises InvalidConfig naming each bad field."""
    if not isinstance(raw, dict):
        raise ConfigError("invalid config: the file must be a YAML mapping with student:, data:, teacher:, objective:")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        reported = tuple(_field_path(err["loc"]) for err in exc.errors(include_input=False, include_url=False))
        raise InvalidConfig(format_validation_error(exc), _without_bad_fields(raw, exc), reported) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML, apply `--set` overrides, validate; raises ConfigError naming each bad field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; see examples/configs/ for a starting point")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping (student:, data:, teacher:, objective:)")
    return validate_config(apply_overrides(resolve_input_paths(raw, path.parent), list(overrides or [])))


def resolve_input_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Input paths written in a config file are relative to that file: data.path, data.eval_path, and
    student.model when it names a folder there. Outputs (output_dir, collector.cache) and `--set`
    values stay relative to the working directory, where the command runs."""
    data = raw.get("data")
    if isinstance(data, dict):
        for field in ("path", "eval_path"):
            if isinstance(data.get(field), str) and not Path(data[field]).expanduser().is_absolute():
                data[field] = str((base / Path(data[field]).expanduser()).resolve())
    student = raw.get("student")
    if isinstance(student, dict) and isinstance(student.get("model"), str):
        model = student["model"]
        local = base / model
        if not Path(model).is_absolute() and (model.startswith(".") or local.is_dir()):
            student["model"] = str(local.resolve())
    return raw
