"""One error root for the SDK, and the errors a teacher raises.

Providers translate their client's exceptions into `TeacherError` at the
adapter boundary, saying whether a retry may help and how long the server
asked us to wait. The collector reads only these two fields.
"""

from __future__ import annotations


class OPDError(Exception):
    """Root of every error opd-sdk raises on purpose."""


class ConfigError(OPDError, ValueError):
    """Bad user input: the message names the field and says how to fix it."""


class TeacherError(OPDError):
    """A teacher call failed.

    retriable: a later attempt may succeed (connection error, timeout, 408,
        409, 429, 5xx, a verdict that did not parse).
    retry_after: seconds the server asked us to wait, if it said so.
    status: the HTTP status, when there was one.
    """

    def __init__(
        self,
        message: str,
        *,
        retriable: bool,
        retry_after: float | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.retriable = retriable
        self.retry_after = retry_after
        self.status = status


class TrainingStopped(OPDError):
    """Training stopped before its last step for a reason the user must act on
    (no usable teacher feedback for several steps, a spent budget). The trainer
    saves a checkpoint first; the message says what failed and how to resume."""


class TokenizationMismatch(OPDError):
    """Teacher and student tokenise the same text differently."""
