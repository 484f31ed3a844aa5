"""Translate `openai` / httpx exceptions into `TeacherError` (the adapter boundary).

Typed (see `opd_sdk.errors`): timeouts -> TeacherTimeout, connection errors
-> TeacherConnectionError, 429 -> RateLimited, 5xx / 408 / 409 -> ServerError,
a 200 whose body was not the JSON we expected -> BadResponse (all retried);
401 / 403 -> AuthenticationFailed (not retried, and the collector sends
nothing more), a refused connection -> TeacherConnectionError that is not
retried (nothing is listening: asking again cannot help); any other 4xx and
any other openai error -> ClientError (not retried). With `where` (the
teacher's model and URL) every message names them.
`retry_after` comes from the response's `retry-after-ms` / `retry-after`
headers (see `opd_sdk.feedback.retry.parse_retry_after`).

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
from typing import Any, Iterable

import openai

from opd_sdk.constants import RETRIABLE_STATUS
from opd_sdk.errors import (
    AuthenticationFailed,
    BadResponse,
    ClientError,
    RateLimited,
    ServerError,
    TeacherConnectionError,
    TeacherError,
    TeacherTimeout,
)
from opd_sdk.feedback.retry import parse_retry_after
from opd_sdk.redact import redact

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


def _server_code(exc: openai.APIStatusError) -> str:
    body = exc.body
    inner = body.get("error", body) if isinstance(body, dict) else None
    return str(inner.get("code") or inner.get("type") or "") if isinstance(inner, dict) else ""


def error_for_status(status: int, message: str, *, retry_after: float | None = None,
                     code: str = "") -> TeacherError:
    """The typed error for an HTTP status: 429 RateLimited, 5xx/408/409 ServerError, 401/403
    AuthenticationFailed (with the fix), other 4xx ClientError. A 429 whose code is
    `insufficient_quota` (no credit left: waiting cannot help) is a ClientError."""
    if status in (401, 403):
        return AuthenticationFailed(message + AUTH_FIX, status=status)
    if status == 429 and code == "insufficient_quota":
        return ClientError(message + " (insufficient_quota: add credit or change the key)", status=status)
    if status == 429:
        return RateLimited(message, retry_after=retry_after, status=status)
    if status in RETRIABLE_STATUS:
        return ServerError(message, retry_after=retry_after, status=status)
    return ClientError(message, retry_after=retry_after, status=status)


AUTH_FIX = (" (the server refused the credentials: check the API key (OPENAI_API_KEY, or the teacher's "
            "api_key / api_key_env) and that it may use this model and base_url; nothing more is sent)")
_RATE = ("rate", "quota", "429", "too_many")
_SERVER = ("server", "overload", "unavailable", "internal", "busy", "capacity")


def error_from_body(error: Any, *, secrets: Iterable[str | None] = (), where: str = "") -> TeacherError:
    """The typed error for a provider error object sent with HTTP 200 (`{"error": {...}}`).

    A numeric `code` (or `status`) is read as an HTTP status; a text code or type is
    matched by words: rate/quota -> RateLimited (but `insufficient_quota` ->
    ClientError), timeout -> TeacherTimeout, server/overloaded/unavailable ->
    ServerError (all retried); anything else -> ClientError. The provider's
    message is kept (redacted).
    """
    if isinstance(error, dict):
        message = str(error.get("message") or error.get("msg") or error)
        code = error.get("code", error.get("status"))
        kind = f"{code} {error.get('type', '')}".lower()
    else:
        message, code, kind = str(error), None, str(error).lower()
    prefix = f"teacher {where}: " if where else ""
    text = redact(f"{prefix}provider error in a 200 reply: {message}", list(secrets))[:_MAX_MESSAGE]
    status = int(code) if isinstance(code, int) or (isinstance(code, str) and code.isdigit()) else None
    if status is not None and 400 <= status < 600:
        return error_for_status(status, text)
    if "insufficient_quota" in kind:
        return ClientError(text + " (insufficient_quota: add credit or change the key)")
    if any(w in kind for w in _RATE):
        return RateLimited(text)
    if "timeout" in kind or "timed_out" in kind:
        return TeacherTimeout(text)
    if any(w in kind for w in _SERVER):
        return ServerError(text)
    return ClientError(text)


def connection_refused(exc: BaseException) -> bool:
    """Whether a connection error is a refused connection (nothing listening at the address)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, ConnectionRefusedError) or "connection refused" in str(exc).lower():
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def translate_openai_error(exc: BaseException, *, secrets: Iterable[str | None] = (), where: str = "") -> TeacherError:
    """A typed `TeacherError` for `exc` (see `opd_sdk.errors`); a `TeacherError` passes as it is.

    where: the teacher's model and URL (`Endpoint.where`), named at the start of the message.
    A refused connection (nothing listening) is not retried: the message says to start the
    server or fix base_url.
    """
    secrets = list(secrets)
    prefix = f"teacher {where}: " if where else ""

    def text(message: str) -> str:
        return redact(f"{prefix}{type(exc).__name__}: {message}", secrets)[:_MAX_MESSAGE]

    if isinstance(exc, TeacherError):
        return exc
    if isinstance(exc, openai.APITimeoutError):
        return TeacherTimeout(text("the request timed out"))
    if isinstance(exc, openai.APIConnectionError) and connection_refused(exc):
        return TeacherConnectionError(text("connection refused: nothing is listening there; start the "
                                           "server or fix base_url"), retriable=False)
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__
        detail = f" ({type(cause).__name__})" if cause is not None else ""
        return TeacherConnectionError(text(f"connection error{detail}"))
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        retry_after = parse_retry_after(exc.response.headers) if exc.response is not None else None
        return error_for_status(status, text(f"HTTP {status}: {_server_message(exc)}"), retry_after=retry_after,
                                code=_server_code(exc))
    if isinstance(exc, openai.APIResponseValidationError):
        return BadResponse(text("the response did not match the API schema"), status=exc.status_code)
    if isinstance(exc, json.JSONDecodeError):
        return BadResponse(text(f"the response body was not valid JSON ({exc.msg})"))
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return TeacherTimeout(text("the request timed out"))
    if isinstance(exc, ConnectionRefusedError):
        return TeacherConnectionError(text("connection refused: nothing is listening there; start the "
                                           "server or fix base_url"), retriable=False)
    if isinstance(exc, (ConnectionError, OSError)):
        return TeacherConnectionError(text("connection error"))
    return ClientError(text(str(exc)))
