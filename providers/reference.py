"""ReferenceTeacher: the teacher model's own sampled answers to the prompt.

What sequence-level distillation from a text-only teacher consumes: SPIN
(Chen et al., 2024) treats them as the "real" data its student must tell
apart from its own samples; DeepSeek-R1's distilled models (2025) were
fine-tuned on such teacher samples. The teacher sees the prompt as chat
messages, plus `request.privileged` as a system message when
`use_privileged=True` (off by default: a reference the student is to imitate
should come from what the student could see too).

`cache_key` depends on the prompt (and privileged context when used), not
on the student's completions, so the FeedbackCollector answers a second
epoch over the same prompts from its cache without a call.
"""

from __future__ import annotations

import json

import openai
from pydantic import BaseModel, ConfigDict, Field

from opd_sdk.constants import DEFAULT_TIMEOUT_S
from opd_sdk.errors import BadResponse, ConfigError
from opd_sdk.feedback.calls import gather_all
from opd_sdk.feedback.teacher import TEMPLATE_PROBE, fingerprint
from opd_sdk.types import Completion, FeedbackRequest, Reference
from providers.client import Endpoint, add_usage, messages_payload, usage_of


class ReferenceParams(BaseModel):
    """ReferenceTeacher's parameters as a config gives them (the `reference` teacher section),
    with their defaults: the constructor's defaults are these."""

    model_config = ConfigDict(extra="forbid")

    n: int = Field(1, gt=0)
    temperature: float = Field(1.0, ge=0.0)
    max_tokens: int = Field(256, gt=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n_per_call: bool = True
    use_privileged: bool = False
    system_prompt: str | None = None


_DEFAULTS = ReferenceParams()


class ReferenceTeacher:
    """n sampled teacher answers per prompt, returned as `Reference`.

    n: answers per prompt. temperature, max_tokens, top_p: sampling.
    n_per_call: whether one call with `n` returns them all (vLLM, OpenAI);
        False makes n separate calls (servers that ignore `n`).
    use_privileged: add request.privileged as a system message.
    system_prompt: optional system message before the prompt.
    """

    def __init__(
        self,
        model: str,
        *,
        n: int = _DEFAULTS.n,
        temperature: float = _DEFAULTS.temperature,
        max_tokens: int = _DEFAULTS.max_tokens,
        top_p: float = _DEFAULTS.top_p,
        n_per_call: bool = _DEFAULTS.n_per_call,
        use_privileged: bool = _DEFAULTS.use_privileged,
        system_prompt: str | None = _DEFAULTS.system_prompt,
        base_url: str | None = None,
        api_key: str | None = None,
        client: openai.AsyncOpenAI | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if n < 1:
            raise ConfigError(f"n: need at least 1 reference per prompt, got {n}")
        if temperature < 0:
            raise ConfigError(f"temperature: must be >= 0, got {temperature}")
        self.endpoint = Endpoint(model, base_url=base_url, api_key=api_key, client=client, timeout=timeout)
        self.n, self.temperature, self.max_tokens, self.top_p = n, temperature, max_tokens, top_p
        self.n_per_call, self.use_privileged, self.system_prompt = n_per_call, use_privileged, system_prompt
        self.id = fingerprint(
            "reference", **self.endpoint.id_params(), n=n, temperature=temperature, max_tokens=max_tokens,
            top_p=top_p, use_privileged=use_privileged, system_prompt=system_prompt,
            template=self.messages(TEMPLATE_PROBE),
        )

    def __repr__(self) -> str:
        return f"ReferenceTeacher(model={self.endpoint.model!r}, base_url={self.endpoint.base_url!r}, n={self.n})"

    async def aclose(self) -> None:
        """Close the HTTP client of the running event loop (each loop's closes with it anyway)."""
        await self.endpoint.aclose()

    def api_calls(self, request: FeedbackRequest) -> int:
        return 1 if self.n_per_call else self.n

    def cache_key(self, request: FeedbackRequest) -> str:
        """The prompt (and privileged context if used): not the student's completions."""
        key = {"prompt": request.model_dump(mode="json")["prompt"]}
        if self.use_privileged:
            key["privileged"] = request.privileged
        return json.dumps(key, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    def messages(self, request: FeedbackRequest) -> list[dict[str, str]]:
        system = [self.system_prompt] if self.system_prompt else []
        if self.use_privileged and request.privileged:
            system.append(f"Context for answering (the user does not see it):\n{request.privileged}")
        head = [{"role": "system", "content": "\n\n".join(system)}] if system else []
        return head + messages_payload(request.prompt_messages())

    async def feedback(self, request: FeedbackRequest) -> Reference:
        messages = self.messages(request)
        params = {"temperature": self.temperature, "max_tokens": self.max_tokens, "top_p": self.top_p}
        if self.n_per_call:
            responses = [await self.endpoint.chat(messages, n=self.n, **params)]
        else:
            responses = await gather_all(*(self.endpoint.chat(messages, **params) for _ in range(self.n)))
        choices = [c for r in responses for c in r.choices if c.message.content][: self.n]
        if len(choices) < self.n:
            raise BadResponse(f"teacher returned {len(choices)} non-empty answers, expected {self.n}")
        return Reference(
            completions=[Completion(text=c.message.content) for c in choices],
            details={"finish_reasons": [c.finish_reason for c in choices]},
            usage=add_usage(*(usage_of(r) for r in responses)),
        )
