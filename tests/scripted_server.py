"""A scripted OpenAI-compatible HTTP server on 127.0.0.1, for tests.

It is a real HTTP/1.1 server (asyncio, keep-alive, many concurrent
connections) running in a background thread, so the real `openai` client
(sync or async) talks to it over a socket. It answers enough of the OpenAI
API for judges and logprob teachers, and it can misbehave on cue.

Usage::

    from tests.scripted_server import Fault, ScriptedServer

    def responder(body: dict) -> str | dict:
        # body: the request JSON. Return the reply *content* (wrapped into a
        # chat.completion or text_completion for you) or a full response dict
        # (sent as-is, e.g. to return logprobs).
        return "Score: 7"

    with ScriptedServer(responder, latency=0.05, faults=[Fault.rate_limit(retry_after="0.1"), None]) as srv:
        client = openai.AsyncOpenAI(base_url=srv.base_url, api_key="sk-test", max_retries=0)
        ...
        assert srv.count == 3
        assert srv.max_in_flight <= 8

Constructor (all keyword arguments after `responder` are optional; every
attribute may be reassigned between phases of a test, it is read per request):

- responder(body) -> str | dict: answers POST /v1/chat/completions and
  /v1/completions. Default: replies "Score: 5".
- handlers: {path: callable(body) -> str | dict} for other POST paths (or to
  override the two above). A str is wrapped like the responder's.
- latency: seconds added to every request (after it passes the cap).
- max_concurrency: server-side cap; requests beyond it wait for a slot.
- faults: the per-request script. Either a callable
  `(index, body) -> Fault | None` (index = arrival order, from 0), or a
  sequence consumed one entry per request in arrival order (None = answer
  normally; once it is used up every request is answered normally).
- routes: `(method, path, headers, raw body) -> (status, bytes) | None`, asked first for
  every request (after it is recorded); None lets the server answer as usual. The OpenAI
  Files and Batches routes are one (`tests.scripted_batches.BatchRoutes`).
- fault_rate, seed, random_faults: when the script gives no fault, inject
  one of `random_faults` (default: 429 with retry-after 0, 500, 503) with
  probability `fault_rate`, from `random.Random(seed)`.

`Fault` (build with its class methods; all are frozen dataclasses):

- Fault.rate_limit(retry_after=None, retry_after_ms=None): 429 with those
  header values (strings sent verbatim: "2", "0.5", an HTTP date...).
- Fault.status(code, retry_after=None, retry_after_ms=None, message=None): any
  error status with an OpenAI-style error body (e.g. 500, 503, 400, 401);
  `message` replaces the default error message.
- Fault.delay(seconds): answer normally but this much later (on top of
  `latency`).
- Fault.hang(seconds=30.0): say nothing for that long, then close the
  connection (use it to exceed the client's timeout).
- Fault.drop(): send the headers and half of the body, then close the
  connection.
- Fault.malformed(): 200 with a body that is not JSON.
- Fault.headers_status(code, headers, message=None): any status with any extra
  headers (proxies' delay headers: `llm_provider-retry-after`,
  `x-ratelimit-reset-requests`...).
- Fault.error_in_200(message, code=None, type=None): HTTP 200 whose body is
  `{"error": {...}}` with no choices (what some proxies send).

A responder may return a full response dict, e.g. with `"finish_reason":
"length"` (a reply cut off by the token limit) or log-probs of -9999.

What it records (read these after the requests; all are thread-safe copies):

- srv.requests: list[RequestRecord] in arrival order. A record holds index,
  method, path, body (parsed JSON, or None), has_auth (whether an
  Authorization header came; its value is never stored), headers (all others,
  lower-cased), arrived / started / finished (time.monotonic() on arrival,
  after passing the cap, and when the reply was finished), fault (the fault
  name or "ok").
- srv.count: number of requests received (all paths); srv.count_path(path).
- srv.bodies(path=None): the request bodies.
- srv.arrival_times(): list of `arrived` stamps, sorted.
- srv.max_in_flight: most requests open at once (arrived, not yet answered,
  including those waiting for the cap): what a client-side concurrency limit
  bounds.
- srv.max_served: most requests at once past the cap (<= max_concurrency).
- srv.reset_stats(): forget records and counters (keeps configuration).

GET /v1/models answers a one-model list; other unknown paths get 404.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Callable, Sequence

Responder = Callable[[dict], "str | dict"]


@dataclass(frozen=True)
class Fault:
    """One scripted misbehaviour; build it with the class methods."""

    name: str
    http_status: int | None = None
    headers: tuple[tuple[str, str], ...] = ()
    delay_s: float = 0.0
    hang_s: float | None = None
    drop_connection: bool = False
    malformed_json: bool = False
    message: str | None = None
    error_body: dict | None = None

    @classmethod
    def headers_status(cls, code: int, headers: dict[str, str], message: str | None = None) -> "Fault":
        """Any status with arbitrary extra headers (e.g. a proxy's `llm_provider-retry-after`)."""
        return cls(name=f"http_{code}", http_status=code, headers=tuple(headers.items()), message=message)

    @classmethod
    def error_in_200(cls, message: str, code: Any = None, type: str | None = None) -> "Fault":
        """HTTP 200 whose body is a provider error object `{"error": {...}}`, with no choices."""
        return cls(name="error_in_200", error_body={"message": message, "code": code, "type": type})

    @classmethod
    def status(cls, code: int, retry_after: str | None = None, retry_after_ms: str | None = None,
               message: str | None = None) -> "Fault":
        headers = []
        if retry_after is not None:
            headers.append(("retry-after", str(retry_after)))
        if retry_after_ms is not None:
            headers.append(("retry-after-ms", str(retry_after_ms)))
        return cls(name=f"http_{code}", http_status=code, headers=tuple(headers), message=message)

    @classmethod
    def rate_limit(cls, retry_after: str | None = None, retry_after_ms: str | None = None) -> "Fault":
        return cls.status(429, retry_after, retry_after_ms)

    @classmethod
    def delay(cls, seconds: float) -> "Fault":
        return cls(name="delay", delay_s=seconds)

    @classmethod
    def hang(cls, seconds: float = 30.0) -> "Fault":
        return cls(name="hang", hang_s=seconds)

    @classmethod
    def drop(cls) -> "Fault":
        return cls(name="drop", drop_connection=True)

    @classmethod
    def malformed(cls) -> "Fault":
        return cls(name="malformed", malformed_json=True)


DEFAULT_RANDOM_FAULTS = (Fault.status(429, retry_after="0"), Fault.status(500), Fault.status(503))


@dataclass
class RequestRecord:
    index: int
    method: str
    path: str
    body: Any
    has_auth: bool
    headers: dict[str, str]
    arrived: float
    started: float | None = None
    finished: float | None = None
    fault: str = "ok"


def _default_responder(body: dict) -> str:
    return "Score: 5"


def _estimate_tokens(text: str) -> int:
    return max(1, len(text) // 4)


def wrap_reply(path: str, body: dict, content: str) -> dict:
    """Wrap reply text into a chat.completion or text_completion response."""
    model = str(body.get("model", "scripted"))
    if path.endswith("/chat/completions"):
        prompt = " ".join(str(m.get("content", "")) for m in body.get("messages", []))
        return {
            "id": "chatcmpl-scripted", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": _estimate_tokens(prompt), "completion_tokens": _estimate_tokens(content),
                      "total_tokens": _estimate_tokens(prompt) + _estimate_tokens(content)},
        }
    prompt = body.get("prompt", "")
    prompt = prompt if isinstance(prompt, str) else json.dumps(prompt)
    return {
        "id": "cmpl-scripted", "object": "text_completion", "created": 0, "model": model,
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None, "text": content}],
        "usage": {"prompt_tokens": _estimate_tokens(prompt), "completion_tokens": _estimate_tokens(content),
                  "total_tokens": _estimate_tokens(prompt) + _estimate_tokens(content)},
    }


class ScriptedServer:
    """See the module docstring."""

    def __init__(
        self,
        responder: Responder | None = None,
        *,
        handlers: dict[str, Callable[[dict], "str | dict"]] | None = None,
        latency: float = 0.0,
        max_concurrency: int | None = None,
        faults: Any = None,
        fault_rate: float = 0.0,
        seed: int = 0,
        random_faults: Sequence[Fault] = DEFAULT_RANDOM_FAULTS,
        routes: Callable[[str, str, dict, bytes], tuple[int, bytes] | None] | None = None,
    ) -> None:
        self.responder = responder or _default_responder
        self.routes = routes
        self.handlers = dict(handlers or {})
        self.latency = latency
        self.max_concurrency = max_concurrency
        self.faults = faults
        self.fault_rate = fault_rate
        self.random_faults = tuple(random_faults)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []
        self._queue: deque | None = None
        self._queue_src: Any = None
        self._open = 0
        self._served = 0
        self._max_open = 0
        self._max_served = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._conn_tasks: set[asyncio.Task] = set()
        self._cap: asyncio.Semaphore | None = None
        self._cap_size: int | None = None
        self.port: int = 0

    # ----- lifecycle -------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "ScriptedServer":
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._on_connection, "127.0.0.1", 0, backlog=1024)
            )
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="scripted-openai-server", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("scripted server did not start within 10 s")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for task in list(self._conn_tasks):
                task.cancel()
            await asyncio.gather(*self._conn_tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> "ScriptedServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----- what tests read -------------------------------------------------
    @property
    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._records)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._records)

    def count_path(self, path: str) -> int:
        return sum(1 for r in self.requests if r.path == path)

    def bodies(self, path: str | None = None) -> list[Any]:
        return [r.body for r in self.requests if path is None or r.path == path]

    def arrival_times(self) -> list[float]:
        return sorted(r.arrived for r in self.requests)

    @property
    def max_in_flight(self) -> int:
        with self._lock:
            return self._max_open

    @property
    def max_served(self) -> int:
        with self._lock:
            return self._max_served

    def reset_stats(self) -> None:
        with self._lock:
            self._records.clear()
            self._max_open = self._open
            self._max_served = self._served

    # ----- fault choice ----------------------------------------------------
    def _choose_fault(self, index: int, body: Any) -> Fault | None:
        script = self.faults
        fault = None
        if callable(script):
            fault = script(index, body)
        elif script is not None:
            with self._lock:
                if self._queue_src is not script:  # a new script was assigned
                    self._queue_src, self._queue = script, deque(script)
                fault = self._queue.popleft() if self._queue else None
        if fault is None and self.fault_rate > 0:
            with self._lock:
                if self._rng.random() < self.fault_rate:
                    fault = self._rng.choice(self.random_faults)
        return fault

    # ----- HTTP ------------------------------------------------------------
    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conn_tasks.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = (lines[0].split(" ", 2) + ["", ""])[:3]
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                raw = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                keep = await self._handle(method, target.split("?", 1)[0], headers, raw, writer)
                if not keep or headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:  # the server is stopping
            return
        finally:
            self._conn_tasks.discard(task)
            writer.close()

    async def _handle(self, method: str, path: str, headers: dict[str, str], raw: bytes,
                      writer: asyncio.StreamWriter) -> bool:
        """Answer one request; return whether the connection stays open."""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        stored = {k: v for k, v in headers.items() if k != "authorization"}
        with self._lock:
            record = RequestRecord(index=len(self._records), method=method, path=path, body=body,
                                   has_auth="authorization" in headers, headers=stored,
                                   arrived=time.monotonic())
            self._records.append(record)
            self._open += 1
            self._max_open = max(self._max_open, self._open)
        try:
            routed = self.routes(method, path, headers, raw) if self.routes is not None else None
            if routed is not None:
                await self._send_raw(writer, routed[0], routed[1], ())
                return True
            if self.max_concurrency is not None and self._cap_size != self.max_concurrency:
                self._cap, self._cap_size = asyncio.Semaphore(self.max_concurrency), self.max_concurrency
            cap = self._cap if self.max_concurrency is not None else None
            if cap is not None:
                await cap.acquire()
            try:
                with self._lock:
                    self._served += 1
                    self._max_served = max(self._max_served, self._served)
                record.started = time.monotonic()
                return await self._respond(record, method, path, body, writer)
            finally:
                with self._lock:
                    self._served -= 1
                if cap is not None:
                    cap.release()
        finally:
            record.finished = time.monotonic()
            with self._lock:
                self._open -= 1

    async def _respond(self, record: RequestRecord, method: str, path: str, body: Any,
                       writer: asyncio.StreamWriter) -> bool:
        if method == "GET" and path == "/v1/models":
            await self._send(writer, 200, {"object": "list", "data": [
                {"id": "scripted", "object": "model", "created": 0, "owned_by": "tests"}]})
            return True
        handler = self.handlers.get(path)
        if handler is None and path in ("/v1/chat/completions", "/v1/completions"):
            handler = self.responder
        if method != "POST" or handler is None:
            await self._send(writer, 404, {"error": {"message": f"no route {method} {path}", "type": "not_found"}})
            return True
        fault = self._choose_fault(record.index, body)
        record.fault = fault.name if fault else "ok"
        delay = self.latency + (fault.delay_s if fault else 0.0)
        if delay > 0:
            await asyncio.sleep(delay)
        if fault is not None and fault.hang_s is not None:
            await asyncio.sleep(fault.hang_s)
            return False
        if fault is not None and fault.http_status is not None:
            text = fault.message or f"scripted {fault.http_status}"
            err = {"error": {"message": text, "type": "scripted", "code": None}}
            await self._send(writer, fault.http_status, err, fault.headers)
            return True
        if fault is not None and fault.error_body is not None:
            await self._send(writer, 200, {"error": fault.error_body})
            return True
        if fault is not None and fault.malformed_json:
            await self._send_raw(writer, 200, b'{"id": "chatcmpl-broken", "choices": [', ())
            return True
        reply = handler(body if isinstance(body, dict) else {})
        if isinstance(reply, str):
            reply = wrap_reply(path, body if isinstance(body, dict) else {}, reply)
        if fault is not None and fault.drop_connection:
            data = json.dumps(reply).encode()
            head = self._head(200, len(data), ())
            writer.write(head + data[: len(data) // 2])
            await writer.drain()
            return False
        await self._send(writer, 200, reply)
        return True

    @staticmethod
    def _head(status: int, length: int, extra: Sequence[tuple[str, str]]) -> bytes:
        lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "content-type: application/json",
                 f"content-length: {length}", "x-request-id: req-scripted"]
        lines += [f"{k}: {v}" for k, v in extra]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _send(self, writer: asyncio.StreamWriter, status: int, obj: Any,
                    extra: Sequence[tuple[str, str]] = ()) -> None:
        await self._send_raw(writer, status, json.dumps(obj).encode(), extra)

    async def _send_raw(self, writer: asyncio.StreamWriter, status: int, data: bytes,
                        extra: Sequence[tuple[str, str]]) -> None:
        writer.write(self._head(status, len(data), extra) + data)
        await writer.drain()
