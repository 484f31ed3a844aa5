"""One error root for the SDK, and the typed errors a teacher raises.

Providers translate their client's exceptions into a `TeacherError` subclass
at the adapter boundary. The collector decides from the type alone whether
to retry and which `FeedbackFailure.error_type` to record:

| class                     | retried | error_type     | typical cause                           |
|---------------------------|---------|----------------|-----------------------------------------|
| `RateLimited`             | yes     | "rate_limited" | HTTP 429, a 200 whose body says so      |
| `ServerError`             | yes     | "server_error" | HTTP 5xx, 408, 409                      |
| `TeacherTimeout`          | yes     | "timeout"      | no answer in time                       |
| `TeacherConnectionError`  | yes     | "connection"   | refused / dropped connection            |
| `BadResponse`             | yes     | "bad_response" | malformed body, a verdict that did not parse |
| `ClientError`             | no      | "client_error" | other 4xx: bad request, auth, not found |
| `Unsupported` (ClientError)| no     | "unsupported"  | the server lacks a feature the teacher needs |
| `Truncated` (ClientError) | no      | "truncated"    | the reply hit the token limit           |
| `Refused` (ClientError)   | no      | "refused"      | a refusal, a content filter, an empty reply |
| `AuthenticationFailed` (ClientError) | no, and nothing more is sent | "auth" | HTTP 401 / 403: bad or missing key |
| `TokenizationMismatch` (ClientError) | no | "tokenization_mismatch" | teacher and student split text differently |

Every one carries `status` (the HTTP status, when there was one) and
`retry_after` (seconds the server asked us to wait, when it said so).
An exception that is not a `TeacherError` coming out of a teacher is a bug:
the collector lets it propagate.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

from opd_sdk.types import FeedbackFailure


class OPDError(Exception):
    """Root of every error opd-sdk raises on purpose."""


class ConfigError(OPDError, ValueError):
    """Bad user input: the message names the field and says how to fix it."""


class TeacherError(OPDError):
    """A teacher call failed. Raise a subclass; the base is for a kind not listed.

    retriable: a later attempt may succeed (default: the class's).
    retry_after: seconds the server asked us to wait, if it said so.
    status: the HTTP status, when there was one.
    """

    error_type: ClassVar[str] = "teacher_error"
    default_retriable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        retriable: bool | None = None,
        retry_after: float | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.retriable = self.default_retriable if retriable is None else bool(retriable)
        self.retry_after = retry_after
        self.status = status


class RateLimited(TeacherError):
    """HTTP 429 (or a 200 whose error body says rate limit); retried after `retry_after` or backoff."""

    error_type = "rate_limited"
    default_retriable = True


class ServerError(TeacherError):
    """HTTP 5xx, 408 or 409, or a provider error body that says the server failed; retried."""

    error_type = "server_error"
    default_retriable = True


class TeacherTimeout(TeacherError):
    """No answer within the timeout; retried."""

    error_type = "timeout"
    default_retriable = True


class TeacherConnectionError(TeacherError):
    """The connection failed or dropped; retried."""

    error_type = "connection"
    default_retriable = True


class BadResponse(TeacherError):
    """The server answered, but not with what we can read (malformed JSON, a verdict
    that did not parse, the wrong number of values); retried."""

    error_type = "bad_response"
    default_retriable = True


class ClientError(TeacherError):
    """The request itself is wrong (HTTP 400, 401, 403, 404, 422...): retrying cannot help."""

    error_type = "client_error"
    default_retriable = False


class Unsupported(ClientError):
    """The server cannot do what the teacher needs (no echo, no log-probs...); the message
    names the missing feature."""

    error_type = "unsupported"


class Truncated(ClientError):
    """The reply was cut off by the token limit (`finish_reason == "length"`); the message
    says which `max_tokens` to raise."""

    error_type = "truncated"


class Refused(ClientError):
    """The model answered but gave no answer: a refusal (`message.refusal`), a content filter
    (`finish_reason == "content_filter"`) or empty content. Not retried (the same prompt is refused
    again, and each try is paid); the message quotes what the provider said."""

    error_type = "refused"


class AuthenticationFailed(ClientError):
    """The server refused the credentials (HTTP 401 / 403): no later call can succeed, so the
    collector sends nothing more and the trainer stops at once; the message says what to fix."""

    error_type = "auth"


class CorruptedFile(OPDError):
    """A file an earlier run wrote (the feedback cache, a checkpoint) cannot be read: junk bytes, cut
    short, half written. `path` names it; the message says what to move aside and what that loses."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)


class TrainingStopped(OPDError):
    """Training stopped before its last step for a reason the user must act on
    (no usable teacher feedback for several steps, a spent budget). The trainer
    saves a checkpoint first; the message says what failed and how to resume."""


class TrainingFailed(TrainingStopped):
    """Training ran its steps but did not learn: more than `max_failed_step_share` of them had no
    usable teacher feedback (failed calls left no sample with a learning signal). The trainer
    saves a checkpoint, and no `final/`: an untrained student is never presented as the result."""


class TokenizationMismatch(ClientError):
    """Teacher and student tokenise the same text differently (not retried: the same
    text splits the same way again). Raised by teachers and by the objectives."""

    error_type = "tokenization_mismatch"


TEACHER_ERRORS: dict[str, type[TeacherError]] = {
    cls.error_type: cls
    for cls in (TeacherError, RateLimited, ServerError, TeacherTimeout, TeacherConnectionError, BadResponse,
                ClientError, Unsupported, Truncated, TokenizationMismatch, AuthenticationFailed, Refused)
}


def error_from_failure(failure: FeedbackFailure, prefix: str = "") -> TeacherError:
    """The typed error that re-raises a `FeedbackFailure` value (a composite's child failed):
    same kind, retriability and status; an unknown kind becomes a plain `TeacherError`."""
    cls = TEACHER_ERRORS.get(failure.error_type, TeacherError)
    return cls(prefix + failure.reason, retriable=failure.retriable, status=failure.status)
