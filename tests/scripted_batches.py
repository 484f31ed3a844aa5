"""The OpenAI Files and Batches routes for the scripted server, for tests of mode="batch".

    with ScriptedServer(responder) as srv:
        batches = BatchRoutes(srv, fate=lambda custom_id, body, n: "expire" if n == 0 else None)
        ...
        assert batches.created == 2

Serves POST /v1/files (multipart upload, as the openai client sends it), GET /v1/files/{id}
and /v1/files/{id}/content, POST /v1/batches, GET /v1/batches/{id} and POST
/v1/batches/{id}/cancel, with the OpenAI formats: a batch goes validating -> in_progress ->
completed (or expired) on successive retrieves; its output file holds one
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}` line
per answered request, its error file one `{"custom_id", "response": null, "error": {"code",
"message"}}` line per request that got none. Each line is answered by the server's own
responder (or handlers), as the online route would answer it.

fate(custom_id, body, n) decides a line's lot in the n-th batch created (from 0):
None answers it; "fail" puts it in the error file (code "server_error"); "expire" leaves
it unanswered (error code "batch_expired") and makes the batch end "expired"; an int
answers that HTTP status with an OpenAI error body.

hold: while True, batches stay in_progress (a test kills the process that polls them,
then sets hold = False). finish_after: retrieves a batch takes to end (>= 1).

What tests read: created (batches created), lines_sent (lines in all uploaded batches),
retrieves (batch retrieves), batches (id -> the batch object, its lines under "_lines").
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

from tests.scripted_server import ScriptedServer, wrap_reply

Fate = Callable[[str, dict, int], "str | int | None"]


class BatchRoutes:
    """See the module docstring; installs itself as `server.routes`."""

    def __init__(self, server: ScriptedServer, *, fate: Fate | None = None, hold: bool = False,
                 finish_after: int = 2) -> None:
        self.server, self.fate, self.hold, self.finish_after = server, fate, hold, max(1, finish_after)
        self.files: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}
        self.retrieves = 0
        self._ids = itertools.count()
        self._lock = threading.Lock()
        server.routes = self

    @property
    def created(self) -> int:
        return len(self.batches)

    @property
    def lines_sent(self) -> int:
        return sum(len(b["_lines"]) for b in self.batches.values())

    # ----- routing -----------------------------------------------------------------
    def __call__(self, method: str, path: str, headers: dict, raw: bytes) -> tuple[int, bytes] | None:
        parts = path.strip("/").split("/")  # ["v1", "files", id, "content"]
        if parts[:2] not in (["v1", "files"], ["v1", "batches"]):
            return None
        with self._lock:
            if parts[1] == "files":
                if method == "POST" and len(parts) == 2:
                    return self._upload(headers, raw)
                f = self.files.get(parts[2]) if len(parts) > 2 else None
                if f is None:
                    return _error(404, f"no file {path}")
                if len(parts) == 4 and parts[3] == "content":
                    return 200, f["_content"]
                return _json(200, _public(f))
            if method == "POST" and len(parts) == 2:
                return self._create(json.loads(raw))
            b = self.batches.get(parts[2]) if len(parts) > 2 else None
            if b is None:
                return _error(404, f"no batch {path}")
            if method == "POST" and parts[3:] == ["cancel"]:
                if b["status"] not in ("completed", "failed", "expired", "cancelled"):
                    b["status"], b["cancelled_at"] = "cancelled", int(time.time())
                    self._finish(b, cancelled=True)
                return _json(200, _public(b))
            self.retrieves += 1
            return _json(200, _public(self._advance(b)))

    def _upload(self, headers: dict, raw: bytes) -> tuple[int, bytes]:
        head = f"Content-Type: {headers.get('content-type', '')}\r\n\r\n".encode()
        form = {p.get_param("name", header="content-disposition"): p.get_payload(decode=True)
                for p in BytesParser(policy=HTTP).parsebytes(head + raw).iter_parts()}
        file_id = f"file-{next(self._ids)}"
        self.files[file_id] = {"id": file_id, "object": "file", "bytes": len(form["file"]), "created_at": 0,
                               "filename": "upload.jsonl", "purpose": form["purpose"].decode(),
                               "status": "processed", "_content": form["file"]}
        return _json(200, _public(self.files[file_id]))

    def _create(self, body: dict) -> tuple[int, bytes]:
        source = self.files.get(body.get("input_file_id", ""))
        if source is None:
            return _error(400, f"input file {body.get('input_file_id')!r} not found")
        lines = [json.loads(x) for x in source["_content"].decode().splitlines() if x.strip()]
        batch_id = f"batch_{len(self.batches)}"
        self.batches[batch_id] = {
            "id": batch_id, "object": "batch", "endpoint": body["endpoint"], "input_file_id": source["id"],
            "completion_window": body["completion_window"], "status": "validating", "created_at": int(time.time()),
            "output_file_id": None, "error_file_id": None, "metadata": body.get("metadata"),
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            "_lines": lines, "_n": len(self.batches), "_polls": 0,
        }
        return _json(200, _public(self.batches[batch_id]))

    # ----- a batch's life ------------------------------------------------------------
    def _advance(self, b: dict) -> dict:
        if b["status"] in ("completed", "failed", "expired", "cancelled"):
            return b
        b["_polls"] += 1
        if self.hold or b["_polls"] < self.finish_after:
            b["status"] = "in_progress"
            return b
        self._finish(b)
        return b

    def _finish(self, b: dict, cancelled: bool = False) -> None:
        out, err, expired = [], [], False
        for line in b["_lines"]:
            fate = "cancel" if cancelled else self.fate(line["custom_id"], line["body"], b["_n"]) if self.fate else None
            cid = line["custom_id"]
            if fate in ("fail", "expire", "cancel"):
                code = {"fail": "server_error", "expire": "batch_expired", "cancel": "batch_cancelled"}[fate]
                expired |= fate == "expire"
                err.append({"id": f"req-{cid}", "custom_id": cid, "response": None,
                            "error": {"code": code, "message": f"scripted {code}"}})
                continue
            if isinstance(fate, int):
                status, body = fate, {"error": {"message": f"scripted {fate}", "type": "scripted", "code": None}}
            else:
                status, body = 200, self._answer(line["url"], line["body"])
            out.append({"id": f"req-{cid}", "custom_id": cid, "error": None,
                        "response": {"status_code": status, "request_id": f"req-{cid}", "body": body}})
        for rows, key in ((out, "output_file_id"), (err, "error_file_id")):
            if rows:
                file_id = f"file-{next(self._ids)}"
                content = "".join(json.dumps(r) + "\n" for r in rows).encode()
                self.files[file_id] = {"id": file_id, "object": "file", "bytes": len(content), "created_at": 0,
                                       "filename": f"{key}.jsonl", "purpose": "batch_output", "status": "processed",
                                       "_content": content}
                b[key] = file_id
        b["request_counts"] = {"total": len(b["_lines"]), "completed": len(out), "failed": len(err)}
        if not cancelled:
            b["status"] = "expired" if expired else "completed"

    def _answer(self, url: str, body: dict) -> Any:
        handler = self.server.handlers.get(url) or self.server.responder
        reply = handler(body)
        return wrap_reply(url, body, reply) if isinstance(reply, str) else reply


def _public(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if not k.startswith("_")}


def _json(status: int, obj: Any) -> tuple[int, bytes]:
    return status, json.dumps(obj).encode()


def _error(status: int, message: str) -> tuple[int, bytes]:
    return _json(status, {"error": {"message": message, "type": "invalid_request_error", "code": None}})
