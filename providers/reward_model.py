"""RewardModelTeacher: any HTTP reward endpoint, one scalar per completion.

The default JSON contract is OpenRLHF's remote reward model
(`--remote_rm_url`): POST `{"query": [prompt + completion, ...], "prompts":
[prompt, ...], "labels": [answer, ...]}`, answer `{"rewards": [r, ...]}`
(one request carries all completions of a prompt). Another contract is two
small functions: `build_payload(request) -> dict` and
`parse_rewards(json, n) -> list[float]`, or just different key names.

Rewards are returned as given (not normalised; `normalize=(lo, hi)` maps a
known range to [0, 1]). A reply whose rewards are missing, not numbers or
the wrong count is a retriable `TeacherError`, never a zero.
HTTP errors are translated here (httpx): connection errors, timeouts, 408,
409, 429 and 5xx are retriable and honour Retry-After; other 4xx are not.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import httpx
from pydantic import BaseModel, ConfigDict

from opd_sdk.constants import DEFAULT_TIMEOUT_S
from opd_sdk.errors import (
    BadResponse,
    ConfigError,
    TeacherConnectionError,
    TeacherTimeout,
)
from opd_sdk.feedback.calls import metered_call
from opd_sdk.feedback.empty import score_nonempty
from opd_sdk.feedback.retry import parse_retry_after
from opd_sdk.feedback.teacher import callable_fingerprint, fingerprint
from opd_sdk.types import MISSING, CallUsage, FeedbackRequest, Score
from providers.client import without_userinfo
from providers.openai_errors import connection_refused, error_for_status, redact


def openrlhf_payload(request: FeedbackRequest, keys: dict[str, str]) -> dict[str, Any]:
    """OpenRLHF-style body: query = prompt + completion, prompts, labels (answer or "")."""
    prompt = request.prompt_text()
    label = request.metadata.get("answer", request.privileged)
    n = len(request.completions)
    return {
        keys["query"]: [prompt + c.text for c in request.completions],
        keys["prompts"]: [prompt] * n,
        keys["labels"]: ["" if label is None else str(label)] * n,
    }


class RewardModelParams(BaseModel):
    """RewardModelTeacher's parameters as a config gives them (the `reward_model` teacher
    section), with their defaults: the constructor's defaults are these."""

    model_config = ConfigDict(extra="forbid")

    query_key: str = "query"
    prompts_key: str = "prompts"
    labels_key: str = "labels"
    rewards_key: str = "rewards"
    normalize: tuple[float, float] | None = None
    headers: dict[str, str] | None = None


_DEFAULTS = RewardModelParams()


class RewardModelTeacher:
    """Scores from an HTTP reward model; see the module docstring.

    url: the endpoint, e.g. "http://127.0.0.1:5000/get_reward".
    api_key: sent as `Authorization: Bearer ...` when given (default env
        OPD_REWARD_API_KEY); never part of `id`, repr or errors.
    query_key, prompts_key, labels_key, rewards_key: key names of the
        default contract.
    build_payload(request) -> dict, parse_rewards(body, n) -> list[float]:
        replace the default contract entirely.
    normalize: (lo, hi) of the model's rewards, to map them to [0, 1].
    client: an httpx.AsyncClient to reuse (else one is made per call).
    """

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        query_key: str = _DEFAULTS.query_key,
        prompts_key: str = _DEFAULTS.prompts_key,
        labels_key: str = _DEFAULTS.labels_key,
        rewards_key: str = _DEFAULTS.rewards_key,
        build_payload: Callable[[FeedbackRequest], dict] | None = None,
        parse_rewards: Callable[[Any, int], list[float]] | None = None,
        normalize: tuple[float, float] | None = _DEFAULTS.normalize,
        headers: dict[str, str] | None = _DEFAULTS.headers,
        timeout: float = DEFAULT_TIMEOUT_S,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"url: need an http(s) URL of the reward endpoint, got {url!r}")
        if normalize is not None and not normalize[0] < normalize[1]:
            raise ConfigError(f"normalize: need (lo, hi) with lo < hi, got {normalize!r}")
        self.url = url
        self._keys = {"query": query_key, "prompts": prompts_key, "labels": labels_key}
        self.rewards_key = rewards_key
        self._build, self._parse, self.normalize = build_payload, parse_rewards, normalize
        self._api_key = api_key or os.environ.get("OPD_REWARD_API_KEY") or None
        self._headers = dict(headers or {})
        if self._api_key:
            self._headers["Authorization"] = f"Bearer {self._api_key}"
        self._timeout = timeout
        self._client = client
        # the id covers the payload / parser functions' code and captured values (no cache when unreadable)
        codes = [callable_fingerprint(f) if f is not None else (None, None) for f in (build_payload, parse_rewards)]
        self.uncached_reason = next((why for _, why in codes if why is not None), None)
        self.id = fingerprint(
            "reward_model", url=url, keys=self._keys, rewards_key=rewards_key, normalize=normalize,
            build_payload=getattr(build_payload, "__qualname__", None),
            parse_rewards=getattr(parse_rewards, "__qualname__", None),
            code=[c for c, _ in codes],
        )

    def __repr__(self) -> str:
        return f"RewardModelTeacher(url={self.url!r})"

    def payload(self, request: FeedbackRequest) -> dict[str, Any]:
        return self._build(request) if self._build else openrlhf_payload(request, self._keys)

    def rewards(self, body: Any, n: int) -> list[float]:
        if self._parse is not None:
            values = self._parse(body, n)
        elif isinstance(body, dict) and self.rewards_key in body:
            values = body[self.rewards_key]
        else:
            keys = sorted(body) if isinstance(body, dict) else type(body).__name__
            raise BadResponse(f"reward reply has no {self.rewards_key!r} list (got {keys})")
        if not isinstance(values, list) or len(values) != n:
            raise BadResponse(f"reward reply: expected {n} rewards, got {values!r:.120}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise BadResponse(f"reward reply: rewards must be finite numbers, got {values!r:.120}")
        return [float(v) for v in values]

    async def _post(self, body: dict) -> Any:
        """One POST, counted by the collector as an HTTP call (`opd_sdk.feedback.calls`; no token
        usage: not priced). Errors name the URL (never the key); a refused connection is not retried."""
        where = f"reward model at {without_userinfo(self.url)}"
        async with metered_call() as call:
            try:
                if self._client is not None:
                    response = await self._client.post(self.url, json=body, headers=self._headers)
                else:  # a client per call: safe across event loops (collect_sync may run a new one each time)
                    async with httpx.AsyncClient(timeout=self._timeout) as client:
                        response = await client.post(self.url, json=body, headers=self._headers)
            except httpx.TimeoutException as exc:
                raise TeacherTimeout(f"{where}: timed out ({type(exc).__name__})") from exc
            except httpx.ConnectError as exc:
                if connection_refused(exc):
                    raise TeacherConnectionError(f"{where}: connection refused: nothing is listening there; start "
                                                 "the server or fix url", retriable=False) from exc
                raise TeacherConnectionError(f"{where}: connection error ({type(exc).__name__})") from exc
            except httpx.TransportError as exc:
                raise TeacherConnectionError(f"{where}: connection error ({type(exc).__name__})") from exc
            if response.status_code != 200:
                text = redact(response.text[:200], [self._api_key])
                raise error_for_status(response.status_code, f"{where}: HTTP {response.status_code}: {text}",
                                       retry_after=parse_retry_after(response.headers))
            try:
                answer = response.json()
            except ValueError as exc:
                raise BadResponse(f"{where}: the reply was not JSON") from exc
            call.answered(answer)
            return answer

    async def feedback(self, request: FeedbackRequest) -> Score:
        """Rewards (normalised when `normalize` is set). An empty completion is not sent
        (`opd_sdk.feedback.empty`): it gets 0.0, the floor, when `normalize` is set; on the model's
        raw scale 0.0 may beat a wrong answer, so it is missing (NaN) there."""
        return await score_nonempty(request, self._score, empty_score=0.0 if self.normalize else MISSING)

    async def _score(self, request: FeedbackRequest) -> Score:
        body = await self._post(self.payload(request))
        raw = self.rewards(body, len(request.completions))
        scores = raw
        if self.normalize is not None:
            lo, hi = self.normalize
            scores = [min(1.0, max(0.0, (r - lo) / (hi - lo))) for r in raw]
        return Score(scores=scores, details={"raw": raw}, usage=CallUsage(calls=1))
