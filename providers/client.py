"""Common setup for every teacher that talks to an OpenAI-compatible endpoint.

One `Endpoint` holds the model name, the base URL and an `openai.AsyncOpenAI`
client (built here from base_url / api_key, which default to the
OPENAI_BASE_URL / OPENAI_API_KEY environment variables, or injected by the
user). It makes the two calls teachers need (chat completions, legacy text
completions), translates every client error into a `TeacherError` at this
boundary, and reads the API's token counts into a `CallUsage`.

The SDK's own retries are switched off (`max_retries=0`) on clients built
here, and on an injected client too (through `with_options(max_retries=0)`,
a copy that shares its connection pool): the FeedbackCollector owns
retries, rate limits and the budget, and a second hidden retry loop would
make its counts and its Retry-After handling wrong.

An HTTP connection pool belongs to the event loop it was first used on, and
each FeedbackCollector runs its own loop; so the first loop uses the client
as built (or injected) and any other loop gets a copy with the same settings
and a fresh connection pool. Each loop's client is closed on that loop when
the loop shuts down its async generators (`asyncio.run` does at its end,
`FeedbackCollector.close()` does too). One teacher can then serve
`asyncio.run(teacher.self_test())`, several collectors, and a collector made
after another closed, without "Event loop is closed" errors. (An injected
client's custom http_client is used on its first loop only.)

Inside a `FeedbackCollector(mode="batch")` collection the endpoint hands out the collection's
recording client instead (`opd_sdk.feedback.batch.batch_client`): each call becomes an OpenAI
Batch API line and its answer comes back as the HTTP reply, so a teacher needs no change.

A 200 whose body is an error object (`{"error": {...}}`, no `choices`) is a
provider error, typed by its code (`openai_errors.error_from_body`).

The API key is kept only inside the openai client: it never enters `id`,
`repr`, `id_params()` or error text.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.parse
import weakref
from typing import Any, AsyncIterator

import openai

from opd_sdk.constants import DEFAULT_TIMEOUT_S
from opd_sdk.errors import BadResponse, ConfigError, TeacherError
from opd_sdk.feedback.batch import batch_client
from opd_sdk.feedback.calls import call_key, metered_call
from opd_sdk.types import CallUsage
from providers.openai_errors import error_from_body, translate_openai_error

# what the openai client raises for a failed call (anything else is a bug and propagates)
_CLIENT_ERRORS = (openai.OpenAIError, json.JSONDecodeError, OSError, asyncio.TimeoutError)


class Endpoint:
    """An OpenAI-compatible endpoint: model + base URL + async client.

    base_url: e.g. "http://127.0.0.1:8011/v1" (vLLM), "https://api.openai.com/v1".
        Default: env OPENAI_BASE_URL, else the openai client's own default.
    model: the served model name (required).
    api_key: default env OPENAI_API_KEY; servers that need no key (a local
        vLLM) get a placeholder.
    client: an `openai.AsyncOpenAI` to use instead of building one
        (then base_url is read from it and api_key is ignored).
    timeout: per-call timeout in seconds for a client built here.
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        client: openai.AsyncOpenAI | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if not model or not isinstance(model, str):
            raise ConfigError("model: give the served model name, e.g. model='smollm2' or model='gpt-4o-mini'")
        self.model = model
        if client is not None:
            if not isinstance(client, openai.AsyncOpenAI):
                raise ConfigError(
                    f"client: expected an openai.AsyncOpenAI, got {type(client).__name__}; "
                    "the synchronous openai.OpenAI client would block the event loop"
                )
            self._root = client.with_options(max_retries=0)
        else:
            base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
            key = api_key or os.environ.get("OPENAI_API_KEY") or None
            if key is None and base_url is None:
                raise ConfigError(
                    f"model {model!r}: no API key and no base URL, so every call would go to the OpenAI API "
                    "without a key. Set OPENAI_API_KEY (or pass api_key=...) for a hosted API, or point "
                    "base_url (or OPENAI_BASE_URL) at your server, e.g. base_url='http://127.0.0.1:8000/v1' "
                    "for a local vLLM")
            key = key or "EMPTY"  # a local server that needs no key gets a placeholder
            self._root = openai.AsyncOpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=0)
        self._root_taken = False
        self._per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[openai.AsyncOpenAI, Any]] = (
            weakref.WeakKeyDictionary()
        )
        self.base_url = str(self._root.base_url).rstrip("/")
        self.schema_supported = True  # set False once the server rejects response_format

    @property
    def client(self) -> openai.AsyncOpenAI:
        """The client for the running event loop (see the module docstring); outside a
        loop, the root client (for reading settings, not for calls)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return self._root
        held = self._per_loop.get(loop)
        return held[0] if held is not None else self._root

    async def _client_here(self) -> openai.AsyncOpenAI:
        """The client for the running loop, made on first use there.

        Each loop's client is held by an async generator started on that loop: the
        loop's `shutdown_asyncgens()` (run by `asyncio.run` at its end, and by
        `FeedbackCollector.close()`) closes it, so its connections are closed on their
        own loop while it still runs, never later by the garbage collector.
        """
        recording = batch_client(self._root)
        if recording is not None:  # FeedbackCollector(mode="batch"): calls become Batch API lines
            return recording
        loop = asyncio.get_running_loop()
        held = self._per_loop.get(loop)
        if held is None:
            if self._root_taken:
                client = self._root.copy(http_client=openai.DefaultAsyncHttpxClient())
            else:
                client, self._root_taken = self._root, True
            keeper = _keep_until_loop_shutdown(client)
            await keeper.__anext__()  # registers the generator with this loop
            held = self._per_loop[loop] = (client, keeper)
        return held[0]

    async def aclose(self) -> None:
        """Close the running loop's client now (other loops' clients close with their loops)."""
        held = self._per_loop.pop(asyncio.get_running_loop(), None)
        if held is not None:
            await held[1].aclose()

    def _secrets(self) -> list[str]:
        key = getattr(self.client, "api_key", None)
        return [key] if isinstance(key, str) else []

    @property
    def where(self) -> str:
        """The model and URL, as every error names them (never a key; user:password in the URL dropped)."""
        return f"{self.model} at {without_userinfo(self.base_url)}"

    def id_params(self) -> dict[str, str]:
        """What identifies the endpoint in a teacher's fingerprint (no key)."""
        return {"model": self.model, "base_url": self.base_url}

    def __repr__(self) -> str:
        return f"Endpoint(model={self.model!r}, base_url={self.base_url!r})"

    async def chat(self, messages: list[dict[str, str]], **params: Any) -> Any:
        """POST /chat/completions; returns the openai ChatCompletion (with at least one choice).

        Raises a typed `TeacherError` naming the model and URL (see `providers.openai_errors`),
        also for a 200 whose body is an error object instead of choices. The call is counted
        and held to the budget by the collector (`opd_sdk.feedback.calls`); within one request,
        an answer that came back is not asked again on a retry.
        """
        return await self._send("chat", messages, params)

    async def chat_json(
        self, messages: list[dict[str, str]], name: str, schema: dict[str, Any], structured: str, **params: Any
    ) -> Any:
        """Chat call asking for JSON that follows `schema` where the server takes one.

        structured: "json_schema" always sends `response_format` (an error if
        the server rejects it); "none" never does; "auto" sends it, and when
        the server answers 400 to it, tries once without it: if that call
        succeeds the endpoint stops sending a schema for good (the caller's
        prompt still asks for JSON and its parser is lenient); if it fails
        too, its error is raised and the schema stays on (the 400 was about
        something else; so does a 400 that says the context overflowed).
        """
        if structured != "none" and self.schema_supported:
            fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
            try:
                return await self.chat(messages, response_format=fmt, **params)
            except TeacherError as err:
                if structured != "auto" or err.status != 400 or context_overflow(err):
                    raise
            response = await self.chat(messages, **params)
            self.schema_supported = False
            return response
        return await self.chat(messages, **params)

    async def complete(self, prompt: str | list[int], **params: Any) -> Any:
        """POST /completions (legacy text completions); returns the openai Completion (as `chat`)."""
        return await self._send("completions", prompt, params)

    async def _send(self, path: str, content: Any, params: dict[str, Any]) -> Any:
        key = call_key(self.model, self.base_url, path, content, params)
        async with metered_call(key) as call:
            if call.kept is not None:
                return call.kept
            client = await self._client_here()
            try:
                if path == "chat":
                    response = await client.chat.completions.create(model=self.model, messages=content, **params)
                else:
                    response = await client.completions.create(model=self.model, prompt=content, **params)
            except _CLIENT_ERRORS as exc:  # every client failure crosses here as a TeacherError
                raise translate_openai_error(exc, secrets=self._secrets(), where=self.where) from exc
            call.replied(paid_usage(response))
            checked = self._checked(response)
            if usable(checked):  # a refusal or a filtered reply is paid, not an answer
                call.answered(checked)
            return checked

    def _checked(self, response: Any) -> Any:
        """`response` if it holds choices; a 200 with an error body (or nothing) raises typed."""
        if getattr(response, "choices", None):
            return response
        extra = getattr(response, "model_extra", None) or {}
        error = extra.get("error")
        if error is not None:
            raise error_from_body(error, secrets=self._secrets(), where=self.where)
        raise BadResponse(f"teacher {self.where}: the server answered 200 with no choices and no error object")


async def _keep_until_loop_shutdown(client: openai.AsyncOpenAI) -> AsyncIterator[None]:
    """Yield once, then close `client` when the loop shuts its async generators down."""
    try:
        yield
        await asyncio.Event().wait()  # never resumed: only closed
    finally:
        await client.close()


_OVERFLOW_WORDS = ("context length", "context window", "maximum context", "too long", "too many tokens",
                   "maximum input", "max_model_len", "exceeds the model")


def context_overflow(err: BaseException) -> bool:
    """Whether an error says the input did not fit the model's context (vLLM, OpenAI, llama.cpp wording)."""
    return any(w in str(err).lower() for w in _OVERFLOW_WORDS)


def usage_of(response: Any) -> CallUsage:
    """One API call's usage, from the response's `usage` numbers (0 when absent)."""
    usage = getattr(response, "usage", None)
    return CallUsage(
        calls=1,
        prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
        completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
    )


def paid(error: TeacherError, *usages: CallUsage) -> TeacherError:
    """`error` carrying the usage of the answered calls it follows (`error.usage`): a refusal or
    a verdict that never parsed was still billed; `FeedbackFailure.from_error` keeps it."""
    error.usage = add_usage(*usages)  # type: ignore[attr-defined]
    return error


def paid_usage(response: Any) -> CallUsage | None:
    """The reply's usage when it carried one (a billed call), else None."""
    return usage_of(response) if getattr(response, "usage", None) is not None else None


def usable(response: Any) -> bool:
    """Whether a reply is an answer: not a refusal, not stopped by a content filter."""
    choice = response.choices[0]
    message = getattr(choice, "message", None)
    return getattr(choice, "finish_reason", None) != "content_filter" and not getattr(message, "refusal", None)


def without_userinfo(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def add_usage(*parts: CallUsage) -> CallUsage:
    """Sum of several calls' usage."""
    return CallUsage(
        calls=sum(p.calls for p in parts),
        prompt_tokens=sum(p.prompt_tokens for p in parts),
        completion_tokens=sum(p.completion_tokens for p in parts),
    )


def messages_payload(messages: list[Any]) -> list[dict[str, str]]:
    """ChatMessage models (or dicts) as the plain dicts the client sends."""
    return [m if isinstance(m, dict) else {"role": m.role, "content": m.content} for m in messages]
