"""The OpenAI Batch API as a way to ask a teacher: half the price, answers within 24 hours.

    collector = FeedbackCollector(teacher, mode="batch", cache="run/feedback_cache.sqlite")
    feedback = collector.collect_sync(requests)   # as online: one Feedback per request, failures as values

For collections that need no answer within seconds (teacher references for SFT, SPIN and GAD,
scoring an eval set, labelling a dataset); `opd collect CONFIG --batch` runs it on a run's prompts.

How calls become batch lines, the teacher unchanged: each request the cache does not answer runs
`teacher.feedback(request)` as online, but `providers.client.Endpoint` gets its openai client from
`batch_client(root)`: one whose HTTP transport sends nothing. It records the call (url, JSON body)
as a line whose `custom_id` hashes them (the k-th identical call of one request gets suffix k, so
n identical sampling calls stay n lines), and waits. When every request still running waits on a
line, the lines go out: per endpoint and url, a JSONL file uploaded through the Files API and a
batch created on it (completion window 24h), polled with exponential backoff (`poll_s`: first,
longest wait; a progress bar shows lines done of total). Each line's answer in the output file
(HTTP status and body) goes back to the waiting client as its HTTP response: the teacher parses
it, types its errors and re-asks as online; a call that depends on an answer (a judge re-asking
after a verdict that did not parse) goes out in the next batch.

Failures. A line in the error file (failed, or `batch_expired`), missing from a failed or
cancelled batch, or answered 408 / 409 / 429 / 5xx goes out again in the next batch, up to
`max_retries` times; then its requests become `FeedbackFailure`s (retriable; "batch_expired" or
"batch_failed"), or the teacher reads the last 429 / 5xx (its typed error). Any other status (a
400) is the answer, not retried. A Files / Batches call that fails past the SDK's retries sends
the lines in the next round if no batch was made, else fails them ("batch_api") and leaves the
batch for the next run. A failure is never cached.

Resume. A batch's id is written, before it is polled, to `<cache file>.batches.json`
(`batch_files.BatchLedger`) with its custom_ids. A process killed while the batch is pending
leaves it there: the next run, making the same calls, polls or reads that batch instead of paying
for another (an id the server does not know is dropped). A finished run drops what it read.

Cost. Each answer's `usage` (one the teacher cannot parse too: it is billed) is counted at the
collector's prices x (1 - discount), discount 0.5 by default (OpenAI's batch price is half). The
budget is checked before a batch is created, so the overshoot is at most one round of batches.
Not applied: rpm / tpm, the per-call timeout, the collector's backoff (a batch may take 24 h).

Teachers: every leaf of the tree calls its server through `providers.client.Endpoint` (it has an
`endpoint`) or runs in process (`is_local`). The server must serve /v1/files and /v1/batches
(OpenAI does; vLLM does not: a 404 there is a ConfigError that says so).
Source: the OpenAI Batch API guide and reference (platform.openai.com/docs/guides/batch).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol, runtime_checkable

import httpx2
import openai
from tqdm.auto import tqdm

from opd_sdk.constants import BATCH_DISCOUNT, BATCH_POLL_S, RETRIABLE_STATUS
from opd_sdk.errors import ConfigError, TeacherError
from opd_sdk.feedback.answers import check_shape
from opd_sdk.feedback.batch_files import (
    BatchLedger,
    body_digest,
    input_jsonl,
    read_results,
)
from opd_sdk.feedback.teacher import is_local, leaves
from opd_sdk.feedback.usage import Usage
from opd_sdk.redact import redact
from opd_sdk.types import Feedback, FeedbackFailure, FeedbackRequest

log = logging.getLogger("opd_sdk.feedback.batch")

__all__ = ["BATCH_DISCOUNT", "BATCH_POLL_S", "BatchLedger", "BatchMode", "batch_client"]
MAX_LINES = 50_000  # the Batch API's limit on lines per batch
SETTLE_S = 0.02  # a round goes out once no request has made a new call for this long
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})


@runtime_checkable
class EndpointTeacher(Protocol):
    """A teacher that calls its server through `providers.client.Endpoint`."""

    endpoint: Any


@dataclass
class _Call:
    """The context one request's teacher call runs in (a context variable: every task the
    teacher starts inherits it)."""

    run: _Run
    unit: int
    seen: dict[str, int] = field(default_factory=dict)  # body digest -> identical calls made so far


_ROUTE: ContextVar[_Call | None] = ContextVar("opd_batch_call", default=None)


def batch_client(root: openai.AsyncOpenAI) -> openai.AsyncOpenAI | None:
    """For `providers.client.Endpoint`: inside a batch collection, the client that turns calls
    to `root`'s server into batch lines; None outside one (the endpoint calls as usual)."""
    call = _ROUTE.get()
    return None if call is None else call.run.recording_client(root)


@dataclass
class _Line:
    custom_id: str
    url: str  # "/v1/chat/completions"
    body: dict
    root: openai.AsyncOpenAI
    answer: asyncio.Future  # (status, body)
    units: set[int] = field(default_factory=set)
    tries: int = 0  # batches it went out in
    batch: str | None = None  # the batch it is in now


class BatchMode:
    """The settings of a collector in mode="batch"; `collect` asks the teacher through the Batch API.

    ledger: where pending batch ids are kept (`BatchLedger`, beside the cache).
    usage: the collector's counters (tokens and cost are added at the batch price).
    prices: (USD per 1k prompt tokens, per 1k completion tokens) at the synchronous price.
    discount: the batch price is prices x (1 - discount); 0 <= discount < 1.
    poll_s: (first wait, longest wait) between polls of a batch, in seconds.
    max_retries: batches a line may go out in after its first.
    budget_usd: no batch is created once this much was spent.
    progress: show a bar per batch.
    """

    def __init__(self, ledger: BatchLedger, *, usage: Usage, prices: tuple[float, float], discount: float,
                 poll_s: tuple[float, float], max_retries: int, budget_usd: float | None, progress: bool) -> None:
        if not 0 <= discount < 1:
            raise ConfigError(f"batch_discount must be in [0, 1) (0.5: half price), got {discount!r}")
        if not (len(poll_s) == 2 and 0 < poll_s[0] <= poll_s[1]):
            raise ConfigError(f"batch_poll_s: (first wait, longest wait) with 0 < first <= longest, got {poll_s!r}")
        self.ledger, self.usage, self.discount, self.poll_s = ledger, usage, float(discount), poll_s
        self.prices = (prices[0] * (1 - discount), prices[1] * (1 - discount))
        self.max_retries, self.budget_usd, self.progress = max_retries, budget_usd, progress

    @staticmethod
    def check_teacher(teacher: Any) -> None:
        """ConfigError unless every leaf of `teacher` calls through an Endpoint or runs in process."""
        bad = [leaf for leaf in leaves(teacher) if not (isinstance(leaf, EndpointTeacher) or is_local(leaf))]
        if bad:
            raise ConfigError(f"mode='batch' needs teachers that call an OpenAI-compatible server through "
                              f"providers.client.Endpoint (judge, preference, reference, logprob...); "
                              f"{type(bad[0]).__name__} ({bad[0].id}) does not: use mode='online' for it")

    async def collect(self, teacher: Any, units: Sequence[FeedbackRequest]) -> list[Feedback]:
        """One Feedback per unit (aligned); a teacher's bug (not a TeacherError) propagates."""
        run = _Run(self, teacher)
        try:
            return await run.go(list(units))
        finally:
            await run.aclose()


class _Run:
    """One `collect`: the requests' teacher tasks, their lines, and the batches that answer them."""

    def __init__(self, mode: BatchMode, teacher: Any) -> None:
        self.mode, self.teacher = mode, teacher
        self.lines: dict[str, _Line] = {}
        self.waiting: dict[int, int] = defaultdict(int)  # unit -> calls waiting on a line
        self.failed: dict[int, FeedbackFailure] = {}
        self.tasks: list[asyncio.Task] = []
        self.events = 0  # bumped on each new line and each finished request: a round waits for quiet
        self.read: set[str] = set()  # batches read to the end
        self._clients: dict[int, tuple[openai.AsyncOpenAI, openai.AsyncOpenAI, openai.AsyncOpenAI]] = {}
        stored = mode.ledger.entries()
        self.stored = {(e["base_url"], e["url"], cid): e["id"] for e in stored for cid in e["custom_ids"]}

    # ----- the teacher side ------------------------------------------------------
    def recording_client(self, root: openai.AsyncOpenAI) -> openai.AsyncOpenAI:
        held = self._clients.get(id(root))
        if held is None:
            transport = httpx2.MockTransport(partial(self._record, root))
            recording = root.copy(http_client=httpx2.AsyncClient(transport=transport), max_retries=0,
                                  timeout=httpx2.Timeout(None))  # a batch may take hours
            control = root.copy(http_client=openai.DefaultAsyncHttpxClient(),  # files and batches
                                max_retries=openai.DEFAULT_MAX_RETRIES)  # control calls: the SDK's retries
            held = self._clients[id(root)] = (root, recording, control)
        return held[1]

    async def _record(self, root: openai.AsyncOpenAI, request: httpx2.Request) -> httpx2.Response:
        """The recording transport: the call becomes a line; its answer comes back as the response."""
        call = _ROUTE.get()
        assert call is not None and call.run is self, "a batch client was used outside its collection"
        base = str(root.base_url.path).rstrip("/")
        url = "/v1" + request.url.path[len(base):] if request.url.path.startswith(base) else request.url.path
        body = json.loads(request.content)
        digest = body_digest(url, body)
        k = call.seen.get(digest, 0)
        call.seen[digest] = k + 1
        custom_id = f"opd-{digest}-{k}"
        line = self.lines.get(custom_id)
        if line is None:
            line = self.lines[custom_id] = _Line(custom_id, url, body, root, asyncio.get_running_loop().create_future())
            self.events += 1
        line.units.add(call.unit)
        self.waiting[call.unit] += 1
        try:
            status, payload = await asyncio.shield(line.answer)
        finally:
            self.waiting[call.unit] -= 1
        return httpx2.Response(status, json=payload)

    async def _unit(self, i: int, unit: FeedbackRequest) -> Feedback:
        _ROUTE.set(_Call(self, i))
        try:
            return check_shape(await self.teacher.feedback(unit), unit)
        except TeacherError as exc:  # anything else is a bug and propagates
            tries = max((line.tries for line in self.lines.values() if i in line.units), default=0)
            return FeedbackFailure.from_error(exc, tries)
        finally:
            self.events += 1

    # ----- rounds ----------------------------------------------------------------
    async def go(self, units: list[FeedbackRequest]) -> list[Feedback]:
        self.tasks = [asyncio.ensure_future(self._unit(i, u)) for i, u in enumerate(units)]
        try:
            while await self._settle():
                fresh = [line for line in self.lines.values() if line.batch is None and not line.answer.done()]
                assert fresh, "every request waits on a line, yet no line is left to send"
                await self._round(fresh)
            results = []
            for i, task in enumerate(self.tasks):
                results.append(self.failed[i] if i in self.failed else task.result())
        finally:
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
        self.mode.ledger.drop(self.read)
        return results

    async def _settle(self) -> bool:
        """Wait until every request still running waits on a line; False once all are done."""
        while True:
            mark = self.events
            running = [i for i, t in enumerate(self.tasks) if not t.done()]
            if not running:
                return False
            for task in self.tasks:  # a teacher's bug stops the collection now, not after a batch
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            await asyncio.sleep(SETTLE_S)
            if mark == self.events and all(self.waiting[i] > 0 for i in running if not self.tasks[i].done()):
                return True

    async def _round(self, fresh: list[_Line]) -> None:
        """Send the fresh lines (to a stored batch that holds them, else to new batches), wait, deliver."""
        groups: dict[tuple[str, Any], list[_Line]] = defaultdict(list)
        for line in fresh:
            where = (str(line.root.base_url).rstrip("/"), line.url)
            stored = self.stored.get((*where, line.custom_id))
            groups[(stored, line.root) if stored else (None, (line.root, line.url))].append(line)
        work = []
        for (stored, target), lines in groups.items():
            if stored is not None:  # a batch a killed run left pending: resume it, pay nothing again
                log.info("resuming batch %s (%d requests of this run)", stored, len(lines))
                self.stored = {k: v for k, v in self.stored.items() if v != stored}  # adopt it once
                work.append(self._through(target, lines, stored))
            else:
                for start in range(0, len(lines), MAX_LINES):
                    work.append(self._through(target[0], lines[start:start + MAX_LINES], None))
        await asyncio.gather(*work)

    async def _through(self, root: openai.AsyncOpenAI, lines: list[_Line], batch_id: str | None) -> None:
        """One batch for `lines`: created (unless `batch_id` resumes one), polled, read, delivered."""
        self.recording_client(root)
        control, secret = self._clients[id(root)][2], root.api_key
        for line in lines:
            line.batch, line.tries = "pending", line.tries + 1
        try:
            if batch_id is None:
                if self.mode.usage.budget_reached(self.mode.budget_usd):
                    reason = (f"not sent: budget of ${self.mode.budget_usd:.4f} reached "
                              f"(${self.mode.usage.cost_usd:.4f} spent)")
                    self.mode.usage.budget_skipped += len(lines)
                    for line in lines:
                        self._fail(line, FeedbackFailure(reason=reason, error_type="budget", retriable=True))
                    return
                batch_id = await self._create(control, root, lines)
            elif not await self._known(control, batch_id):  # a stored id the server does not know: send anew
                for line in lines:
                    line.batch, line.tries = None, line.tries - 1
                return
            batch = await self._poll(control, batch_id)
            answers, errors = await self._read(control, batch, {line.custom_id for line in lines})
        except openai.OpenAIError as exc:  # an error status, or connection trouble past the SDK's own retries
            if isinstance(exc, openai.APIStatusError) and exc.status_code in (404, 405):
                raise ConfigError(f"{root.base_url} does not serve the Batch API ({exc.request.method} "
                                  f"{exc.request.url.path} answered {exc.status_code}); use mode='online' "
                                  "(opd collect without --batch) for this server") from exc
            problem = ("batch_api", redact(f"the Batch API call failed: {exc!r}", [secret])[:300])
            if batch_id is not None:  # the batch exists (paid): it stays in the ledger for a later run to resume
                for line in lines:
                    self._fail(line, FeedbackFailure(reason=f"{problem[1]}; batch {batch_id} is resumed by the next "
                                                     "run", error_type="batch_api", attempts=line.tries,
                                                     retriable=True))
                return
            answers, batch = {}, None  # nothing was created: the lines go out in the next round
            errors = dict.fromkeys((line.custom_id for line in lines), problem)
        for line in lines:
            self._deliver(line, answers.get(line.custom_id), errors.get(line.custom_id), batch)

    async def _create(self, control: openai.AsyncOpenAI, root: openai.AsyncOpenAI, lines: list[_Line]) -> str:
        url = lines[0].url
        data = input_jsonl(url, [(line.custom_id, line.body) for line in lines])
        upload = await control.files.create(file=("opd-feedback.jsonl", data, "application/jsonl"), purpose="batch")
        batch = await control.batches.create(input_file_id=upload.id, endpoint=url, completion_window="24h",
                                             metadata={"source": "opd-sdk feedback"})
        self.mode.ledger.add({"id": batch.id, "base_url": str(root.base_url).rstrip("/"), "url": url,
                              "custom_ids": [line.custom_id for line in lines]})
        self.mode.usage.requests_sent += len(lines)
        self.mode.usage.retries += sum(line.tries > 1 for line in lines)
        log.info("batch %s created: %d requests to %s (%s)", batch.id, len(lines), root.base_url, url)
        return batch.id

    async def _known(self, control: openai.AsyncOpenAI, batch_id: str) -> bool:
        """Whether the server still has the stored batch `batch_id`; a forgotten one leaves the ledger."""
        try:
            await control.batches.retrieve(batch_id)
            return True
        except openai.NotFoundError:
            log.warning("stored batch %s is unknown to the server; its requests go out in a new batch", batch_id)
            self.mode.ledger.drop({batch_id})
            return False

    async def _poll(self, control: openai.AsyncOpenAI, batch_id: str) -> Any:
        """Retrieve the batch until it ends, waiting poll_s[0], doubling up to poll_s[1]."""
        wait, longest = self.mode.poll_s
        status = None
        with tqdm(desc=f"batch {batch_id}", unit="req", disable=not self.mode.progress, leave=False) as bar:
            while True:
                batch = await control.batches.retrieve(batch_id)
                counts = batch.request_counts
                if counts is not None:
                    bar.total, bar.n = counts.total, counts.completed + counts.failed
                bar.set_postfix_str(batch.status)
                if batch.status != status:
                    status = batch.status
                    done = f" ({counts.completed} of {counts.total} answered, {counts.failed} failed)" if counts else ""
                    log.info("batch %s: %s%s", batch_id, status, done)
                if batch.status in TERMINAL:
                    self.read.add(batch_id)
                    return batch
                await asyncio.sleep(wait)
                wait = min(wait * 2, longest)

    async def _read(self, control: openai.AsyncOpenAI, batch: Any, wanted: set[str]
                    ) -> tuple[dict[str, tuple[int, dict]], dict[str, tuple[str, str]]]:
        """The batch's answers and errors for `wanted` (`read_results`); each answer's tokens are
        counted at the batch price."""
        answers: dict[str, tuple[int, dict]] = {}
        errors: dict[str, tuple[str, str]] = {}
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                got, failed, usages = read_results((await control.files.content(file_id)).text, wanted)
                answers |= got
                errors |= failed
                for usage in usages:
                    self.mode.usage.add_call_usage(usage, price_per_1k_prompt=self.mode.prices[0],
                                                   price_per_1k_completion=self.mode.prices[1])
        return answers, errors

    def _deliver(self, line: _Line, answer: tuple[int, dict] | None, error: tuple[str, str] | None,
                 batch: Any) -> None:
        """Hand the answer to the waiting call, or send the line again, or fail its requests."""
        if answer is not None and (answer[0] not in RETRIABLE_STATUS or line.tries > self.mode.max_retries):
            line.batch = batch.id
            line.answer.set_result(answer)
            return
        if line.tries <= self.mode.max_retries:
            line.batch = None  # next round
            return
        if answer is None and error is None:
            where = f"batch {batch.id} ended {batch.status}" if batch is not None else "the batch"
            error = ("missing", f"{where} without an answer for it")
        code, message = error  # type: ignore[misc]
        kind = "batch_expired" if code == "batch_expired" else "batch_failed"
        reason = redact(f"no answer after {line.tries} batch(es): {code}: {message}")[:500]
        self._fail(line, FeedbackFailure(reason=reason, error_type=kind, attempts=line.tries, retriable=True))

    def _fail(self, line: _Line, failure: FeedbackFailure) -> None:
        log.warning("teacher %s: %s", self.teacher.id, failure.reason)
        for unit in line.units:
            if not self.tasks[unit].done():
                self.failed[unit] = failure
                self.tasks[unit].cancel()

    async def aclose(self) -> None:
        for _, recording, control in self._clients.values():
            await recording.close()
            await control.close()
