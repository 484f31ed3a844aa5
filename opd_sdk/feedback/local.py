"""LocalRunner: a local teacher (verifier, self-distillation) answered in process.

A teacher for which `opd_sdk.feedback.teacher.is_local` is True answers a whole batch
synchronously with `feedback_local(requests)`. It buys nothing from a
thread, an event loop, a semaphore or retries, so `LocalRunner` calls it
directly, in the calling thread (the training thread: a teacher that runs the
student itself never runs beside the step), with the interface of
`opd_sdk.feedback.factory.Collector`. `usage.requests_sent` counts the
requests the teacher answered (not those from the cache).

Per request, a `TeacherError` the teacher returns as a `FeedbackFailure` stays
that failure (never retried: a local check gives the same answer again). A
`TeacherError` raised for the whole batch fails every request of it; any
other exception is a bug and propagates. A cache (a FeedbackCache or a path)
is used only when one is passed and the teacher is cacheable (otherwise it is
ignored: `opd_sdk.feedback.cache.collector_cache`).

Build one with `opd_sdk.feedback.factory.make_collector(teacher, ...)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from opd_sdk.errors import ConfigError, TeacherError
from opd_sdk.feedback.answers import check_shape
from opd_sdk.feedback.cache import FeedbackCache, collector_cache
from opd_sdk.feedback.teacher import inner_collectors, is_local
from opd_sdk.feedback.usage import Usage
from opd_sdk.types import Feedback, FeedbackFailure, FeedbackRequest


class LocalRunner:
    """Runs a local teacher over each batch in the calling thread; see the module docstring.

    teacher: a teacher with `is_local(teacher)` True.
    cache: a FeedbackCache or a path (None: no cache, no SQLite); ignored for a teacher
        that is not cacheable.
    """

    def __init__(self, teacher: Any, *, cache: FeedbackCache | str | Path | None = None) -> None:
        if not is_local(teacher):
            raise ConfigError(f"{teacher!r} is not a local teacher (local=True with feedback_local(requests)); "
                              "use FeedbackCollector, or opd_sdk.make_collector")
        self.teacher = teacher
        self.cache, self._owns_cache = collector_cache(teacher, cache)
        self.usage = Usage()

    def __repr__(self) -> str:
        return f"LocalRunner(teacher={self.teacher!r}, cache={self.cache!r})"

    def collect_sync(self, requests: Sequence[FeedbackRequest]) -> list[Feedback]:
        """One Feedback per request, aligned with `requests`; failures are values."""
        requests = list(requests)
        for i, r in enumerate(requests):
            if not isinstance(r, FeedbackRequest):
                raise ConfigError(f"requests[{i}] is a {type(r).__name__}; build an opd_sdk.FeedbackRequest")
        out: list[Feedback | None] = [None] * len(requests)
        keys = [r.canonical_json() for r in requests]
        if self.cache is not None:
            for i, key in enumerate(keys):
                out[i] = self.cache.get(self.teacher.id, key)
            self.usage.cache_hits += sum(f is not None for f in out)
        todo = [i for i, f in enumerate(out) if f is None]
        if todo:
            batch = [requests[i] for i in todo]
            self.usage.requests_sent += len(batch)
            try:
                answers = list(self.teacher.feedback_local(batch))
                if len(answers) != len(batch):
                    raise ConfigError(f"{self.teacher!r}.feedback_local returned {len(answers)} answers for "
                                      f"{len(batch)} requests")
                checked = []
                for a, r in zip(answers, batch, strict=True):
                    try:
                        checked.append(check_shape(a, r))
                    except TeacherError as exc:
                        checked.append(FeedbackFailure.from_error(exc, attempts=1))
                answers = checked
            except TeacherError as exc:  # the whole batch failed; anything else is a bug and propagates
                answers = [FeedbackFailure.from_error(exc, attempts=1)] * len(batch)
            for i, answer in zip(todo, answers, strict=True):
                out[i] = answer
                if self.cache is not None and not isinstance(answer, FeedbackFailure):
                    self.cache.put(self.teacher.id, keys[i], answer)
        self.usage.failures += sum(isinstance(f, FeedbackFailure) for f in out)
        return out  # type: ignore[return-value]

    async def collect(self, requests: Sequence[FeedbackRequest]) -> list[Feedback]:
        """`collect_sync`, for async callers (it does not yield: the work is local)."""
        return self.collect_sync(requests)

    def close(self) -> None:
        """Close the cache if this runner opened it, and the collectors its teacher asks through
        (`opd_sdk.feedback.teacher.inner_collectors`: GAD's reference teacher). Idempotent."""
        for inner in inner_collectors(self.teacher):
            inner.close()
        if self.cache is not None and self._owns_cache:
            self.cache.close()
            self._owns_cache = False

    def __enter__(self) -> "LocalRunner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
