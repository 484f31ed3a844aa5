"""What the OpenAI Batch API reads and writes, and the ledger of pending batches beside the cache.

- `input_jsonl`: the input file, one `{"custom_id", "method": "POST", "url", "body"}` a line.
- `read_results`: the output file's `{"custom_id", "response": {"status_code", "body"}, "error":
  null}` lines and the error file's `{"custom_id", "response": null, "error": {"code",
  "message"}}` lines, as answers, errors and the billed usage of each answer.
- `BatchLedger`: `<cache file>.batches.json`, the batches a collection created or adopted and has
  not read to the end (ids, hashes, no request text, no key): what a killed run resumes.

Source: the OpenAI Batch API reference (platform.openai.com/docs/api-reference/batch).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from opd_sdk.errors import ConfigError
from opd_sdk.types import CallUsage


def body_digest(url: str, body: dict) -> str:
    """32 hex digits of sha256 over the url and the body's canonical JSON: a call's identity."""
    return hashlib.sha256((url + "\n" + json.dumps(body, sort_keys=True)).encode()).hexdigest()[:32]


def input_jsonl(url: str, lines: list[tuple[str, dict]]) -> bytes:
    """The batch input file for (custom_id, body) pairs, all POSTed to `url`."""
    return "".join(json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body}) + "\n"
                   for cid, body in lines).encode()


def read_results(text: str, wanted: set[str]
                 ) -> tuple[dict[str, tuple[int, dict]], dict[str, tuple[str, str]], list[CallUsage]]:
    """(custom_id -> (HTTP status, body)), (custom_id -> (error code, message)) and the usage of each
    answer (billed whatever its status), for the lines of an output or error file in `wanted`."""
    answers: dict[str, tuple[int, dict]] = {}
    errors: dict[str, tuple[str, str]] = {}
    usages: list[CallUsage] = []
    for raw in text.splitlines():
        row = json.loads(raw) if raw.strip() else {}
        cid = row.get("custom_id")
        if cid not in wanted:
            continue
        response, error = row.get("response"), row.get("error")
        if response:
            body = response.get("body") or {}
            answers[cid] = (int(response["status_code"]), body)
            usage = body.get("usage") or {}
            usages.append(CallUsage(calls=1, prompt_tokens=int(usage.get("prompt_tokens") or 0),
                                    completion_tokens=int(usage.get("completion_tokens") or 0)))
        else:
            error = error or {}
            errors[cid] = (str(error.get("code") or "failed"), str(error.get("message") or ""))
    return answers, errors, usages


class BatchLedger:
    """The batches a run created or adopted and has not read to the end: `<cache>.batches.json`,
    a list of {"id", "base_url", "url", "custom_ids"}. Written whole (temp file + rename), 0600."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def entries(self) -> list[dict]:
        if not self.path.exists():
            return []
        try:
            return list(json.loads(self.path.read_text(encoding="utf-8"))["batches"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{self.path}: not a batch ledger ({exc}); delete it (pending batches are then "
                              "created again and paid again) or restore it") from exc

    def _write(self, entries: list[dict]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"batches": entries}, f)
        os.replace(tmp, self.path)

    def add(self, entry: dict) -> None:
        self._write(self.entries() + [entry])

    def drop(self, ids: set[str]) -> None:
        kept = [e for e in self.entries() if e["id"] not in ids]
        if kept:
            self._write(kept)
        elif self.path.exists():
            self.path.unlink()
