"""An objective's parameters, declared once: a pydantic model beside its class.

Each objective module declares `<Name>Params(ObjectiveParams)` (the fields,
defaults and bounds of its `params:` in YAML) and its class points at it
(`params_model`). The Python constructor validates its keyword arguments
through that model (`ObjectiveParams.parse`), and the config layer
(`opd_sdk.config.registry`) checks a YAML `params:` mapping against the same
model and builds the objective with `from_params(params, ctx)`: there is no
other copy of a default or a bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError

from opd_sdk.errors import ConfigError


class ObjectiveParams(BaseModel):
    """Base of the objectives' parameter models: unknown names are refused, values are fixed once built."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def parse(cls, params: Mapping[str, Any], owner: str) -> Any:
        """The validated parameters; raises ConfigError naming each bad one (`owner: name: what is wrong`)."""
        try:
            return cls.model_validate(dict(params))
        except ValidationError as exc:
            lines = []
            for err in exc.errors(include_input=False, include_url=False):
                name = ".".join(str(p) for p in err["loc"])
                if err["type"] == "extra_forbidden":
                    lines.append(f"{name}: unknown parameter; valid: {', '.join(cls.model_fields)}")
                else:
                    lines.append(f"{name + ': ' if name else ''}{err['msg'].removeprefix('Value error, ')}")
            raise ConfigError(f"{owner}: " + "; ".join(lines)) from None


@dataclass
class ObjectiveContext:
    """What `from_params` may need besides the parameters.

    tokenizer: the student's (SFT and SPIN encode reference text with it; None in checks).
    build(type, params, where): an objective of another `type` from its raw `params`
        (a Hybrid's terms); `where` is the YAML path below this objective's `params`.
    """

    tokenizer: Any = None
    build: Callable[[str, Mapping[str, Any], str], Any] | None = None


class Declared(Protocol):
    """What the config layer reads off an objective class (a value of `OBJECTIVES`)."""

    params_model: ClassVar[type[ObjectiveParams]]

    @classmethod
    def from_params(cls, params: Any, ctx: ObjectiveContext) -> Any:
        """The objective from its validated parameters."""
