"""Translate `openai` / httpx exceptions into `TeacherError` (the adapter boundary).

Retriable: connection errors, timeouts, 408, 409, 429, 5xx, and a 200 whose
body was not the JSON we expected (a truncated or malformed reply). Not
retriable: any other 4xx (bad request, auth, not found...) and anything else.
`retry_after` comes from the response's `retry-after-ms` / `retry-after`
headers (see `opd_sdk.retry.parse_retry_after`).

The message never carries an API key: it is built from the error class, the
status and the server's message, with anything that looks like a key
(`sk-...`, `Bearer ...`) and any `secrets` you pass replaced by `***`.

Usage in a provider::

    try:
        reply = await self._client.chat.completions.create(...)
    except Exception as exc:
        raise translate_openai_error(exc, secrets=[self._api_key]) from exc
"""

from __future__ import annotations

import asyncio
import json
from typing import Iterable

import openai

from opd_sdk.constants import RETRIABLE_STATUS
from opd_sdk.errors import TeacherError
from opd_sdk.redact import redact
from opd_sdk.retry import parse_retry_after

_MAX_MESSAGE = 300


def _server_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if isinstance(inner, str):
            return inner
    return exc.message or ""


def translate_openai_error(exc: BaseException, *, secrets: Iterable[str | None] = ()) -> TeacherError:
    """A `TeacherError` for `exc`, saying whether a retry may help."""
    secrets = list(secrets)

    def make(message: str, *, retriable: bool, retry_after: float | None = None,
             status: int | None = None) -> TeacherError:
        text = redact(f"{type(exc).__name__}: {message}", secrets)[:_MAX_MESSAGE]
        return TeacherError(text, retriable=retriable, retry_after=retry_after, status=status)

    if isinstance(exc, TeacherError):
        return exc
    if isinstance(exc, openai.APITimeoutError):
        return make("the request timed out", retriable=True)
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__
        detail = f" ({type(cause).__name__})" if cause is not None else ""
        return make(f"connection error{detail}", retriable=True)
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        retry_after = parse_retry_after(exc.response.headers) if exc.response is not None else None
        return make(f"HTTP {status}: {_server_message(exc)}", retriable=status in RETRIABLE_STATUS,
                    retry_after=retry_after, status=status)
    if isinstance(exc, openai.APIResponseValidationError):
        return make("the response did not match the API schema", retriable=True, status=exc.status_code)
    if isinstance(exc, json.JSONDecodeError):
        return make(f"the response body was not valid JSON ({exc.msg})", retriable=True)
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return make("the request timed out", retriable=True)
    if isinstance(exc, (ConnectionError, OSError)):
        return make("connection error", retriable=True)
    if isinstance(exc, openai.OpenAIError):
        return make(str(exc), retriable=False)
    return make(str(exc), retriable=False)
