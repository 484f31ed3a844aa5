"""Scrub secrets from text before it reaches a log, a failure reason or a cache."""

from __future__ import annotations

import re
from typing import Iterable

_KEYLIKE = re.compile(r"(sk-[A-Za-z0-9_\-*.]{4,}|Bearer\s+\S+|api[_-]?key[\"']?\s*[=:]\s*[\"']?[^\s\"',}]+)",
                      re.IGNORECASE)


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """`text` with each given secret and anything key-like (`sk-...`,
    `Bearer ...`, `api_key=...`) replaced by `***`."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return _KEYLIKE.sub("***", text)
