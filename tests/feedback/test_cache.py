"""FeedbackCache: exact round trip, no failures, no request text, several processes; no cache for a
teacher whose answers change as the student trains."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3

import pytest

from opd_sdk import (
    CallUsage,
    Completion,
    FeedbackCache,
    FeedbackCollector,
    FeedbackFailure,
    FeedbackRequest,
    LocalRunner,
    Preference,
    PreferencePair,
    Reference,
    Score,
    TokenLogprobs,
)
from opd_sdk.feedback.cache import cache_digest

SAMPLES = [
    Score(scores=[0.1, -2.5, 1e-9], details={"verdicts": ["Score: 1", "x"]}, usage=CallUsage(calls=3, prompt_tokens=7)),
    Preference(pairs=[PreferencePair(winner=1, loser=0, probability=0.75)], details={"raw": {"a": [1, 2]}}),
    Reference(completions=[Completion(text="héllo ✓", token_ids=[1, 2, 3])]),
    TokenLogprobs(logprobs=[[-0.1, -2.3333333333333335], []], top_k=[[{5: -0.1, 17: -3.0}, {2: -1.0}], []]),
]


def test_round_trip_is_exact(tmp_path):
    with FeedbackCache(tmp_path / "c.sqlite") as cache:
        for i, feedback in enumerate(SAMPLES):
            assert cache.put("teacher:1", f"key-{i}", feedback)
    with FeedbackCache(tmp_path / "c.sqlite") as cache:  # reopened: read from disk
        for i, feedback in enumerate(SAMPLES):
            back = cache.get("teacher:1", f"key-{i}")
            assert back == feedback and type(back) is type(feedback)
        got = cache.get("teacher:1", "key-3")
        assert list(got.top_k[0][0]) == [5, 17]  # int keys survive JSON
        assert cache.get("teacher:2", "key-0") is None  # keyed by teacher id too
        assert len(cache) == 4


def test_failures_are_never_stored(tmp_path):
    with FeedbackCache(tmp_path / "c.sqlite") as cache:
        assert cache.put("t", "k", FeedbackFailure(reason="HTTP 500", attempts=6, retriable=True)) is False
        assert cache.get("t", "k") is None and len(cache) == 0


def test_rows_hold_only_digest_teacher_and_feedback(tmp_path):
    path = tmp_path / "c.sqlite"
    with FeedbackCache(path) as cache:
        cache.put("judge:abc", '{"prompt":"SECRET-PROMPT-TEXT"}', Score(scores=[1.0]))
    rows = sqlite3.connect(path).execute("SELECT key, teacher_id, feedback FROM feedback").fetchall()
    assert rows == [(cache_digest("judge:abc", '{"prompt":"SECRET-PROMPT-TEXT"}'), "judge:abc",
                     Score(scores=[1.0]).model_dump_json())]
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _writer(path: str, worker: int, n: int) -> None:
    cache = FeedbackCache(path)
    for i in range(n):
        cache.put("t", f"{worker}-{i}", Score(scores=[float(i)]))
        cache.get("t", f"{(worker + 1) % 3}-{i}")
    cache.close()


def test_several_processes_write_one_file(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    FeedbackCache(path).close()
    ctx = mp.get_context("fork")  # separate processes, separate sqlite connections
    procs = [ctx.Process(target=_writer, args=(path, w, 150)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    with FeedbackCache(path) as cache:
        assert len(cache) == 450
        assert cache.get("t", "2-149") == Score(scores=[149.0])


def test_cache_files_are_readable_by_their_owner_only(tmp_path):
    import os
    import stat

    from opd_sdk.feedback.cache import FeedbackCache
    from opd_sdk.types import Score

    old = os.umask(0o022)  # a usual umask: files would be 0644
    try:
        path = tmp_path / "sub" / "cache.sqlite"
        with FeedbackCache(path) as cache:
            cache.put("t:1", "k", Score(scores=[1.0]))
            files = sorted(p for p in path.parent.iterdir())
            assert [p.name for p in files] == ["cache.sqlite", "cache.sqlite-shm", "cache.sqlite-wal"]
            for p in files:
                assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
        loose = tmp_path / "loose.sqlite"
        FeedbackCache(loose).close()
        os.chmod(loose, 0o644)  # a cache made by an older version
        FeedbackCache(loose).close()
        assert stat.S_IMODE(loose.stat().st_mode) == 0o600
    finally:
        os.umask(old)


class Drifting:
    """A teacher whose answers change as the student trains (`cacheable` False): call n answers n."""

    cacheable = False

    def __init__(self, local: bool) -> None:
        self.id, self.local, self.calls = "drifting:1", local, 0

    def _next(self, request: FeedbackRequest) -> Score:
        self.calls += 1
        return Score(scores=[float(self.calls)] * len(request.completions))

    async def feedback(self, request: FeedbackRequest) -> Score:
        return self._next(request)

    def feedback_local(self, requests: list[FeedbackRequest]) -> list[Score]:
        return [self._next(r) for r in requests]


@pytest.mark.parametrize("local", [False, True])
def test_a_teacher_that_is_not_cacheable_gets_no_cache_from_the_constructor(tmp_path, local):
    """The collector ignores the cache it is given: the second ask is a fresh answer, no file is made."""
    teacher = Drifting(local)
    request = FeedbackRequest(prompt="p", completions=[Completion(text="a")])
    make = LocalRunner if local else lambda t, cache: FeedbackCollector(t, cache=cache, progress=False)
    with make(teacher, cache=tmp_path / "c.sqlite") as collector:
        assert collector.cache is None
        first, again = collector.collect_sync([request]), collector.collect_sync([request])
    assert [first[0].scores, again[0].scores] == [[1.0], [2.0]]  # a cache would have answered 1.0 twice
    assert collector.usage.cache_hits == 0 and list(tmp_path.iterdir()) == []
    shared = FeedbackCache(tmp_path / "shared.sqlite")
    with make(teacher, cache=shared) as collector:
        assert collector.cache is None
        collector.collect_sync([request])
    assert len(shared) == 0  # left open and empty: its owner closes it
    shared.close()
