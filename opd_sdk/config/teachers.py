"""Teacher types: one declaration each, from which the config schema, the registry and the checks are built.

A teacher type is one pydantic model. Its fields are the YAML section
(`teacher:` or an entry of `teachers:`); its class attributes declare the rest:

    provider   "module:Class" that `build` constructs (its signature checks `params`)
    feedback   the feedback kind it returns ("score", "preference", "reference", "token_logprobs")
    remote     True when it calls a network API (needs a key, goes through the collector's limits)
    build()    the factory: (config, BuildContext, YAML path) -> Teacher

`TEACHER_TYPES` lists them; `TeacherConfig` (the schema's union), the
registry's lookups and `check_config` are all derived from that list, so a new
teacher type is one class here plus one line in `TEACHER_TYPES`.

API keys come from the environment only: a teacher names the variable in
`api_key_env`; a literal `api_key` in the YAML is refused.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import Field, field_validator, model_validator

from opd_sdk.config.settings import _Settings as _Strict
from opd_sdk.constants import DEFAULT_TIMEOUT_S
from opd_sdk.errors import ConfigError

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_KEY_FIELDS = {"api_key", "apikey", "key", "token", "api_token", "secret", "authorization"}
_KEY_MESSAGE = (
    "API keys are never read from a config file. Remove `{field}` and set "
    "`api_key_env: NAME` instead, then `export NAME=...` in the shell that runs opd"
)


@dataclass
class BuildContext:
    """What a teacher factory may need besides its config: the student (self-distillation,
    tokenizer matching) and the per-call timeout."""

    model: Any = None
    tokenizer: Any = None
    timeout: float = DEFAULT_TIMEOUT_S


class _TeacherType(_Strict):
    provider: ClassVar[str] = ""
    feedback: ClassVar[str] = "score"
    remote: ClassVar[bool] = False

    @classmethod
    def provider_class(cls) -> type:
        module, name = cls.provider.split(":")
        return getattr(importlib.import_module(module), name)

    def children(self) -> list[tuple[str, Any]]:
        """(YAML path suffix, child config) of a composition; [] for a leaf."""
        return []

    def build(self, ctx: BuildContext, where: str) -> Any:
        raise NotImplementedError

    def _kwargs(self, *fields: str) -> dict[str, Any]:
        out = {f: getattr(self, f) for f in fields if getattr(self, f) is not None}
        out.update(getattr(self, "params", {}))
        return out


class _KeyFromEnv(_TeacherType):
    """A teacher that may need a key: it names the environment variable, never the key."""

    api_key_env: str | None = "OPENAI_API_KEY"

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
            hosted = getattr(self, "base_url", None) is None and not os.environ.get("OPENAI_BASE_URL")
            named = "api_key_env" in self.model_fields_set
            if (hosted and self.remote and self.type != "reward_model") or named:
                raise ConfigError(
                    f"{where}.api_key_env: the environment variable {name} is not set. "
                    f"`export {name}=...` before running, or set {where}.base_url to a local server "
                    "that needs no key (and drop api_key_env)"
                )
        return key


class _ApiTeacher(_KeyFromEnv):
    """Fields every OpenAI-compatible teacher shares; `params` go to the provider as keyword arguments."""

    remote: ClassVar[bool] = True

    model: str = Field(min_length=1)
    base_url: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    def _client_kwargs(self, ctx: BuildContext, where: str) -> dict[str, Any]:
        return dict(base_url=self.base_url, api_key=self.api_key(where), timeout=ctx.timeout)


class JudgeTeacherConfig(_ApiTeacher):
    """providers.JudgeTeacher: a rubric score in [0, 1]. More keyword arguments go in `params`."""

    provider: ClassVar[str] = "providers.judge:JudgeTeacher"
    feedback: ClassVar[str] = "score"

    type: Literal["judge"]
    rubric: str | None = None
    scale: tuple[int, int] = (0, 10)
    mode: Literal["pointwise", "listwise"] = "pointwise"
    g_eval: bool = False  # expected score over the score tokens' top log-probs
    temperature: float = Field(0.0, ge=0.0)

    def build(self, ctx: BuildContext, where: str) -> Any:
        kw = self._kwargs("rubric", "scale", "mode", "g_eval", "temperature")
        return self.provider_class()(self.model, **self._client_kwargs(ctx, where), **kw)


class PreferenceTeacherConfig(_ApiTeacher):
    """providers.PreferenceTeacher: pairwise verdicts, both orders asked."""

    provider: ClassVar[str] = "providers.preference:PreferenceTeacher"
    feedback: ClassVar[str] = "preference"

    type: Literal["preference"]
    criteria: str | None = None
    allow_ties: bool = True

    def build(self, ctx: BuildContext, where: str) -> Any:
        kw = self._kwargs("criteria", "allow_ties")
        return self.provider_class()(self.model, **self._client_kwargs(ctx, where), **kw)


class ReferenceTeacherConfig(_ApiTeacher):
    """providers.ReferenceTeacher: the teacher's own sampled answers (SPIN, SFT on teacher text)."""

    provider: ClassVar[str] = "providers.reference:ReferenceTeacher"
    feedback: ClassVar[str] = "reference"

    type: Literal["reference"]
    n: int = Field(1, gt=0)
    temperature: float = Field(1.0, ge=0.0)
    max_tokens: int = Field(256, gt=0)

    def build(self, ctx: BuildContext, where: str) -> Any:
        kw = self._kwargs("n", "temperature", "max_tokens")
        return self.provider_class()(self.model, **self._client_kwargs(ctx, where), **kw)


class LogprobTeacherConfig(_ApiTeacher):
    """providers.LogprobTeacher: teacher log-probs of the student's tokens (vLLM, llama.cpp)."""

    provider: ClassVar[str] = "providers.logprob:LogprobTeacher"
    feedback: ClassVar[str] = "token_logprobs"

    type: Literal["logprob"]
    top_k: int = Field(0, ge=0)

    def build(self, ctx: BuildContext, where: str) -> Any:
        kw = self._kwargs("top_k")
        return self.provider_class()(self.model, tokenizer=ctx.tokenizer, **self._client_kwargs(ctx, where), **kw)


class RewardModelTeacherConfig(_KeyFromEnv):
    """providers.RewardModelTeacher: an HTTP reward endpoint (OpenRLHF contract by default)."""

    provider: ClassVar[str] = "providers.reward_model:RewardModelTeacher"
    feedback: ClassVar[str] = "score"
    remote: ClassVar[bool] = True

    type: Literal["reward_model"]
    url: str = Field(min_length=1)
    api_key_env: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    def build(self, ctx: BuildContext, where: str) -> Any:
        return self.provider_class()(self.url, api_key=self.api_key(where), timeout=ctx.timeout, **self.params)


class VerifierTeacherConfig(_TeacherType):
    """providers.VerifierTeacher: a rule-based check against PromptItem.answer."""

    provider: ClassVar[str] = "providers.verifier:VerifierTeacher"
    feedback: ClassVar[str] = "score"

    type: Literal["verifier"]
    mode: Literal["exact", "numeric", "regex"] = "numeric"
    atol: float = Field(1e-6, ge=0.0)
    rtol: float = Field(0.0, ge=0.0)
    pattern: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _pattern(self) -> "VerifierTeacherConfig":
        if self.mode == "regex" and not self.pattern:
            raise ValueError("mode `regex` needs `pattern: <regular expression>`")
        return self

    def build(self, ctx: BuildContext, where: str) -> Any:
        return self.provider_class()(**self._kwargs("mode", "atol", "rtol", "pattern"))


class SelfDistillTeacherConfig(_TeacherType):
    """providers.SelfDistillTeacher: the student itself, shown PromptItem.privileged (no network)."""

    provider: ClassVar[str] = "providers.self_distill:SelfDistillTeacher"
    feedback: ClassVar[str] = "token_logprobs"

    type: Literal["self_distill"]
    mode: Literal["live", "frozen", "ema"] = "frozen"
    ema_decay: float = Field(0.99, gt=0.0, lt=1.0)
    placement: Literal["user_suffix", "system"] = "user_suffix"
    template: str | None = None  # must contain {privileged}
    top_k: int = Field(0, ge=0)
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("template")
    @classmethod
    def _has_slot(cls, value: str | None) -> str | None:
        if value is not None and "{privileged}" not in value:
            raise ValueError("the template must contain `{privileged}` where the reference text goes")
        return value

    def build(self, ctx: BuildContext, where: str) -> Any:
        if ctx.model is None or ctx.tokenizer is None:
            raise ConfigError(f"{where}: a self_distill teacher needs the student model and tokenizer")
        from providers.self_distill import PrivilegedTemplate

        template = PrivilegedTemplate(placement=self.placement, text=self.template)
        kw = dict(mode=self.mode, ema_decay=self.ema_decay, top_k=self.top_k, template=template, **self.params)
        return self.provider_class()(ctx.model, ctx.tokenizer, **kw)


class WeightedTeacher(_Strict):
    weight: float
    teacher: "TeacherConfig"


class WeightedSumTeacherConfig(_TeacherType):
    """providers.WeightedSum: sum of weight * score over the child teachers."""

    provider: ClassVar[str] = "providers.compose:WeightedSum"
    feedback: ClassVar[str] = "score"

    type: Literal["weighted_sum"]
    teachers: list[WeightedTeacher] = Field(min_length=1)

    def children(self) -> list[tuple[str, Any]]:
        return [(f"teachers.{i}.teacher", w.teacher) for i, w in enumerate(self.teachers)]

    def build(self, ctx: BuildContext, where: str) -> Any:
        parts = [(build_teacher(w.teacher, ctx, f"{where}.teachers.{i}.teacher"), w.weight) for i, w in enumerate(self.teachers)]
        return self.provider_class()(parts)


class GateTeacherConfig(_TeacherType):
    """providers.Gate: `judge`'s score counts only where `verifier` scores >= threshold, else fail_score."""

    provider: ClassVar[str] = "providers.compose:Gate"
    feedback: ClassVar[str] = "score"

    type: Literal["gate"]
    verifier: "TeacherConfig"
    judge: "TeacherConfig"
    threshold: float = 1.0
    fail_score: float = 0.0

    def children(self) -> list[tuple[str, Any]]:
        return [("verifier", self.verifier), ("judge", self.judge)]

    def build(self, ctx: BuildContext, where: str) -> Any:
        verifier = build_teacher(self.verifier, ctx, f"{where}.verifier")
        judge = build_teacher(self.judge, ctx, f"{where}.judge")
        return self.provider_class()(verifier, judge, threshold=self.threshold, fail_score=self.fail_score)


class PreferenceToScoreConfig(_TeacherType):
    """providers.PreferenceScores: a preference teacher's verdicts as per-completion scores."""

    provider: ClassVar[str] = "providers.compose:PreferenceScores"
    feedback: ClassVar[str] = "score"

    type: Literal["preference_to_score"]
    teacher: "TeacherConfig"
    method: Literal["bradley_terry", "win_rate"] = "bradley_terry"

    def children(self) -> list[tuple[str, Any]]:
        return [("teacher", self.teacher)]

    def build(self, ctx: BuildContext, where: str) -> Any:
        return self.provider_class()(build_teacher(self.teacher, ctx, f"{where}.teacher"), method=self.method)


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
