"""Teacher types: the registry of the providers' declarations, from which the config schema and the checks are built.

Each provider declares its parameters once, beside its class, as a pydantic
model (`providers.judge.JudgeParams`, ...): their names, defaults and bounds,
which are also the provider constructor's defaults. A teacher type here is
one YAML section (`teacher:` or an entry of `teachers:`) made of that model's
fields plus what the config adds (`type`, the endpoint and its key variable,
child teachers), and class attributes that declare the rest:

    provider         the class `build` constructs
    provider_params  its declared parameters (also accepted under `params:`)
    feedback         the feedback kind it returns ("score", "preference", "reference", "token_logprobs")
    remote           True when it calls a network API (needs a key, goes through the collector's limits)
    build()          the factory: (config, BuildContext, YAML path) -> Teacher

`TEACHER_TYPES` lists them; `TeacherConfig` (the schema's union), the
registry's lookups and `check_config` are all derived from that list, so a new
teacher type is its provider's parameter model plus one class here and one
line in `TEACHER_TYPES`.

API keys come from the environment only: a teacher names the variable in
`api_key_env`; a literal `api_key` in the YAML is refused.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, Field, field_validator, model_validator

from opd_sdk.config.settings import _Settings as _Strict
from opd_sdk.constants import DEFAULT_TIMEOUT_S
from opd_sdk.errors import ConfigError
from providers.compose import Gate, GateParams, PreferenceScores, PreferenceScoresParams, WeightedSum, WeightedSumParams
from providers.gad import DiscriminatorTeacher, GADParams
from providers.judge import JudgeParams, JudgeTeacher
from providers.logprob import LogprobParams, LogprobTeacher
from providers.preference import PreferenceParams, PreferenceTeacher
from providers.reference import ReferenceParams, ReferenceTeacher
from providers.reward_model import RewardModelParams, RewardModelTeacher
from providers.self_distill import PrivilegedTemplate, SelfDistillParams, SelfDistillTeacher
from providers.verifier import VerifierParams, VerifierTeacher

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_KEY_FIELDS = {"api_key", "apikey", "key", "token", "api_token", "secret", "authorization"}
_KEY_MESSAGE = (
    "API keys are never read from a config file. Remove `{field}` and set "
    "`api_key_env: NAME` instead, then `export NAME=...` in the shell that runs opd"
)


@dataclass
class BuildContext:
    """What a teacher factory may need besides its config: the student (self-distillation,
    tokenizer matching), the per-call timeout, and `collector(teacher)`, the run's collector
    for a teacher another teacher asks itself (GAD's reference teacher: the run's limits,
    budget and cache; None: `make_collector` defaults). `checking`: built by `check_config` only to
    run the constructor's own checks, never called, so a missing key (reported on its own) does not
    stop them."""

    model: Any = None
    tokenizer: Any = None
    timeout: float = DEFAULT_TIMEOUT_S
    collector: Any = None
    checking: bool = False


class _TeacherType(_Strict):
    provider: ClassVar[type] = object
    provider_params: ClassVar[type[BaseModel]] = BaseModel
    feedback: ClassVar[str] = "score"
    remote: ClassVar[bool] = False

    params: dict[str, Any] = Field(default_factory=dict)  # the provider's parameters, also accepted here

    @model_validator(mode="before")
    @classmethod
    def _no_literal_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in data:
                if str(name).lower() in _KEY_FIELDS:
                    raise ValueError(_KEY_MESSAGE.format(field=name))
            params = data.get("params", None)
            for name in params if isinstance(params, dict) else {}:
                if str(name).lower() in _KEY_FIELDS:
                    raise ValueError(_KEY_MESSAGE.format(field=f"params.{name}"))
        return data

    def children(self) -> list[tuple[str, Any]]:
        """(YAML path suffix, child config) of a composition; [] for a leaf."""
        return []

    def needs_student(self) -> bool:
        """Whether building this teacher needs the student's model or tokenizer (so `opd train --check`,
        which loads no weights, checks its parameters but does not build it)."""
        return False

    def api_key(self, where: str) -> str | None:
        """The API key from the environment; None for a teacher that needs none (raises ConfigError when
        one it needs is missing)."""
        return None

    def build(self, ctx: BuildContext, where: str) -> Any:
        raise NotImplementedError

    def provider_kwargs(self) -> dict[str, Any]:
        """The provider's declared parameters from this section, those given under `params` on top
        (checked against `provider_params` by `check_config`; a bad one raises ValidationError here)."""
        declared = self.provider_params.model_fields
        given = self.provider_params.model_validate(self.params).model_dump(exclude_unset=True)
        return {name: value for name, value in self if name in declared} | given


class _KeyFromEnv(_TeacherType):
    """A teacher that may need a key: it names the environment variable, never the key."""

    api_key_env: str | None = "OPENAI_API_KEY"

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not _ENV_NAME.match(value):
            raise ValueError(
                "must be the NAME of an environment variable (letters, digits, _), not the key "
                "itself: write `api_key_env: OPENAI_API_KEY` and `export OPENAI_API_KEY=...`"
            )
        return value

    def api_key(self, where: str) -> str | None:
        """The key from the variable the config names.

        Missing is an error for a remote API (no base_url and no OPENAI_BASE_URL), and for any
        teacher whose YAML names `api_key_env` explicitly; a local server with the default
        variable unset needs no key.
        """
        name = self.api_key_env
        key = os.environ.get(name) if name else None
        if name and not key:
            if self._hosted() or "api_key_env" in self.model_fields_set:
                raise ConfigError(
                    f"{where}.api_key_env: the environment variable {name} is not set. "
                    f"`export {name}=...` before running, or, for a local server that needs no key, "
                    f"set {where}.base_url to it and {where}.api_key_env: null (--set {where}.api_key_env=null)"
                )
        return key

    def _key(self, ctx: BuildContext, where: str) -> str | None:
        """`api_key`, except that a build for the checks (`ctx.checking`) gets a placeholder in place of a
        missing key: nothing is sent, and the missing key is its own problem in the report."""
        try:
            return self.api_key(where)
        except ConfigError:
            if ctx.checking:
                return "placeholder-for-the-checks"
            raise

    def _hosted(self) -> bool:
        """A hosted API (an OpenAI-compatible teacher with no base_url and no OPENAI_BASE_URL: OpenAI's),
        which always needs a key; an endpoint the config names may need none."""
        return False


class _ApiTeacher(_KeyFromEnv):
    """Fields every OpenAI-compatible teacher shares."""

    remote: ClassVar[bool] = True

    model: str = Field(min_length=1)
    base_url: str | None = None

    def _hosted(self) -> bool:
        return self.base_url is None and not os.environ.get("OPENAI_BASE_URL")

    def _client_kwargs(self, ctx: BuildContext, where: str) -> dict[str, Any]:
        return dict(base_url=self.base_url, api_key=self._key(ctx, where), timeout=ctx.timeout)


class JudgeTeacherConfig(_ApiTeacher, JudgeParams):
    """providers.JudgeTeacher: a rubric score in [0, 1]."""

    provider: ClassVar[type] = JudgeTeacher
    provider_params: ClassVar[type[BaseModel]] = JudgeParams
    feedback: ClassVar[str] = "score"

    type: Literal["judge"]

    def build(self, ctx: BuildContext, where: str) -> Any:
        return JudgeTeacher(self.model, **self._client_kwargs(ctx, where), **self.provider_kwargs())


class PreferenceTeacherConfig(_ApiTeacher, PreferenceParams):
    """providers.PreferenceTeacher: pairwise verdicts, both orders asked."""

    provider: ClassVar[type] = PreferenceTeacher
    provider_params: ClassVar[type[BaseModel]] = PreferenceParams
    feedback: ClassVar[str] = "preference"

    type: Literal["preference"]

    def build(self, ctx: BuildContext, where: str) -> Any:
        return PreferenceTeacher(self.model, **self._client_kwargs(ctx, where), **self.provider_kwargs())


class ReferenceTeacherConfig(_ApiTeacher, ReferenceParams):
    """providers.ReferenceTeacher: the teacher's own sampled answers (SPIN, SFT on teacher text)."""

    provider: ClassVar[type] = ReferenceTeacher
    provider_params: ClassVar[type[BaseModel]] = ReferenceParams
    feedback: ClassVar[str] = "reference"

    type: Literal["reference"]

    def build(self, ctx: BuildContext, where: str) -> Any:
        return ReferenceTeacher(self.model, **self._client_kwargs(ctx, where), **self.provider_kwargs())


class LogprobTeacherConfig(_ApiTeacher, LogprobParams):
    """providers.LogprobTeacher: teacher log-probs of the student's tokens (vLLM, llama.cpp)."""

    provider: ClassVar[type] = LogprobTeacher
    provider_params: ClassVar[type[BaseModel]] = LogprobParams
    feedback: ClassVar[str] = "token_logprobs"

    type: Literal["logprob"]

    def needs_student(self) -> bool:
        return self.send == "token_ids"  # the student's tokenizer builds the prompt ids

    def build(self, ctx: BuildContext, where: str) -> Any:
        kw = self.provider_kwargs()
        return LogprobTeacher(self.model, tokenizer=ctx.tokenizer, **self._client_kwargs(ctx, where), **kw)


class RewardModelTeacherConfig(_KeyFromEnv, RewardModelParams):
    """providers.RewardModelTeacher: an HTTP reward endpoint (OpenRLHF contract by default)."""

    provider: ClassVar[type] = RewardModelTeacher
    provider_params: ClassVar[type[BaseModel]] = RewardModelParams
    feedback: ClassVar[str] = "score"
    remote: ClassVar[bool] = True

    type: Literal["reward_model"]
    url: str = Field(min_length=1)
    api_key_env: str | None = None

    def build(self, ctx: BuildContext, where: str) -> Any:
        return RewardModelTeacher(self.url, api_key=self._key(ctx, where), timeout=ctx.timeout, **self.provider_kwargs())


class VerifierTeacherConfig(_TeacherType, VerifierParams):
    """providers.VerifierTeacher: a rule-based check against PromptItem.answer."""

    provider: ClassVar[type] = VerifierTeacher
    provider_params: ClassVar[type[BaseModel]] = VerifierParams
    feedback: ClassVar[str] = "score"

    type: Literal["verifier"]

    def build(self, ctx: BuildContext, where: str) -> Any:
        return VerifierTeacher(**self.provider_kwargs())


class SelfDistillTeacherConfig(_TeacherType, SelfDistillParams):
    """providers.SelfDistillTeacher: the student itself, shown PromptItem.privileged (no network).

    placement, template: the `PrivilegedTemplate` (its placement and text, which must contain
    {privileged}; None: the placement's default text)."""

    provider: ClassVar[type] = SelfDistillTeacher
    provider_params: ClassVar[type[BaseModel]] = SelfDistillParams
    feedback: ClassVar[str] = "token_logprobs"

    type: Literal["self_distill"]

    def needs_student(self) -> bool:
        return True
    placement: Literal["user_suffix", "system"] = PrivilegedTemplate.placement
    template: str | None = PrivilegedTemplate.text

    @field_validator("template")
    @classmethod
    def _has_slot(cls, value: str | None) -> str | None:
        if value is not None and "{privileged}" not in value:
            raise ValueError("the template must contain `{privileged}` where the reference text goes")
        return value

    def build(self, ctx: BuildContext, where: str) -> Any:
        if ctx.model is None or ctx.tokenizer is None:
            raise ConfigError(f"{where}: a self_distill teacher needs the student model and tokenizer")
        template = PrivilegedTemplate(placement=self.placement, text=self.template)
        return SelfDistillTeacher(ctx.model, ctx.tokenizer, template=template, **self.provider_kwargs())


class GADTeacherConfig(_TeacherType, GADParams):
    """providers.DiscriminatorTeacher (GAD): a discriminator trained to prefer `teacher`'s text
    (a `reference` teacher) to the student's answers; its score is the reward (no network itself)."""

    provider: ClassVar[type] = DiscriminatorTeacher
    provider_params: ClassVar[type[BaseModel]] = GADParams
    feedback: ClassVar[str] = "score"

    type: Literal["gad"]
    teacher: TeacherConfig | None = None

    @model_validator(mode="after")
    def _needs_text(self) -> GADTeacherConfig:
        if self.source == "teacher" and self.teacher is None:
            raise ValueError("source: teacher needs `teacher: {type: reference, model: ..., base_url: ...}` (the API "
                             "teacher whose text the discriminator learns to prefer), or source: answer")
        if self.teacher is not None and self.teacher.type != "reference":
            raise ValueError(f"teacher: GAD needs the teacher's text, from a `reference` teacher, not {self.teacher.type!r}")
        return self

    def children(self) -> list[tuple[str, Any]]:
        return [("teacher", self.teacher)] if self.teacher is not None else []

    def needs_student(self) -> bool:
        return True

    def build(self, ctx: BuildContext, where: str) -> Any:
        if ctx.model is None or ctx.tokenizer is None:
            raise ConfigError(f"{where}: a gad teacher needs the student model and tokenizer")
        reference = None
        if self.teacher is not None:
            reference = build_teacher(self.teacher, ctx, f"{where}.teacher")
            reference = ctx.collector(reference) if ctx.collector is not None else reference
        return DiscriminatorTeacher(ctx.model, ctx.tokenizer, reference, **self.provider_kwargs())


class WeightedTeacher(_Strict):
    weight: float
    teacher: "TeacherConfig"


class WeightedSumTeacherConfig(_TeacherType):
    """providers.WeightedSum: sum of weight * score over the child teachers."""

    provider: ClassVar[type] = WeightedSum
    provider_params: ClassVar[type[BaseModel]] = WeightedSumParams
    feedback: ClassVar[str] = "score"

    type: Literal["weighted_sum"]
    teachers: list[WeightedTeacher] = Field(min_length=1)

    def children(self) -> list[tuple[str, Any]]:
        return [(f"teachers.{i}.teacher", w.teacher) for i, w in enumerate(self.teachers)]

    def build(self, ctx: BuildContext, where: str) -> Any:
        parts = [(build_teacher(w.teacher, ctx, f"{where}.teachers.{i}.teacher"), w.weight) for i, w in enumerate(self.teachers)]
        return WeightedSum(parts)


class GateTeacherConfig(_TeacherType, GateParams):
    """providers.Gate: `judge`'s score counts only where `verifier` scores >= threshold, else fail_score."""

    provider: ClassVar[type] = Gate
    provider_params: ClassVar[type[BaseModel]] = GateParams
    feedback: ClassVar[str] = "score"

    type: Literal["gate"]
    verifier: "TeacherConfig"
    judge: "TeacherConfig"

    def children(self) -> list[tuple[str, Any]]:
        return [("verifier", self.verifier), ("judge", self.judge)]

    def build(self, ctx: BuildContext, where: str) -> Any:
        verifier = build_teacher(self.verifier, ctx, f"{where}.verifier")
        judge = build_teacher(self.judge, ctx, f"{where}.judge")
        return Gate(verifier, judge, **self.provider_kwargs())


class PreferenceToScoreConfig(_TeacherType, PreferenceScoresParams):
    """providers.PreferenceScores: a preference teacher's verdicts as per-completion scores."""

    provider: ClassVar[type] = PreferenceScores
    provider_params: ClassVar[type[BaseModel]] = PreferenceScoresParams
    feedback: ClassVar[str] = "score"

    type: Literal["preference_to_score"]
    teacher: "TeacherConfig"

    def children(self) -> list[tuple[str, Any]]:
        return [("teacher", self.teacher)]

    def build(self, ctx: BuildContext, where: str) -> Any:
        return PreferenceScores(build_teacher(self.teacher, ctx, f"{where}.teacher"), **self.provider_kwargs())


# The one list: everything else is derived from it.
TEACHER_TYPES: tuple[type[_TeacherType], ...] = (
    JudgeTeacherConfig,
    PreferenceTeacherConfig,
    ReferenceTeacherConfig,
    LogprobTeacherConfig,
    RewardModelTeacherConfig,
    VerifierTeacherConfig,
    SelfDistillTeacherConfig,
    WeightedSumTeacherConfig,
    GateTeacherConfig,
    PreferenceToScoreConfig,
    GADTeacherConfig,
)


def type_name(model: type[_TeacherType]) -> str:
    """The YAML `type:` value a teacher model declares (its Literal)."""
    return model.model_fields["type"].annotation.__args__[0]


TEACHERS: dict[str, type[_TeacherType]] = {type_name(m): m for m in TEACHER_TYPES}
TeacherConfig = Annotated[Union[TEACHER_TYPES], Field(discriminator="type")]  # type: ignore[valid-type]
for _model in (WeightedTeacher, *TEACHER_TYPES):
    _model.model_rebuild()


def build_teacher(cfg: Any, ctx: BuildContext | None = None, where: str = "teacher") -> Any:
    """The Teacher a config describes; TypeErrors from a constructor become ConfigErrors naming the field."""
    try:
        return cfg.build(ctx or BuildContext(), where)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}; check {where}.params against the provider's arguments") from None
