"""The one protocol every teacher implements.

A teacher has a stable `id`: a fingerprint of its model, prompt template and
parameters. The collector's cache is keyed by it, so two teachers that would
answer differently must have different ids, and an id must never contain a
secret. `feedback` answers one request; it raises `TeacherError` on a failed
call (the collector retries and turns the final failure into a value).

A teacher that batches natively (a local model) may also define
`feedback_batch(requests) -> list[Feedback]`; the collector then hands it
whole batches of cache misses.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Protocol, runtime_checkable

from opd_sdk.types import Feedback, FeedbackRequest


@runtime_checkable
class Teacher(Protocol):
    @property
    def id(self) -> str: ...

    async def feedback(self, request: FeedbackRequest) -> Feedback: ...


def fingerprint(kind: str, **params: Any) -> str:
    """A stable teacher id: `kind:` + a short hash of the parameters.

    Pass everything that changes the teacher's answers (model, base_url,
    template, temperature...). Never pass an API key.
    """
    blob = json.dumps(params, sort_keys=True, default=str, separators=(",", ":"))
    return f"{kind}:{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A stable identity of a tokenizer: `tok:` + a short hash of its vocabulary, special
    tokens and chat template. Two tokenizers with the same fingerprint encode text to the
    same ids, so a teacher may use a request's token ids as they are."""
    vocab = tokenizer.get_vocab()
    blob = json.dumps(
        {
            "vocab": sorted(vocab.items(), key=lambda kv: kv[1]),
            "special": {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())},
            "chat_template": getattr(tokenizer, "chat_template", None),
        },
        sort_keys=True,
        default=str,
    )
    return f"tok:{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
