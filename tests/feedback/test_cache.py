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


def _filled_cache(path, rows: int, values_per_row: int = 4) -> None:
    """A real cache file of `rows` Score rows (one transaction: fast)."""
    FeedbackCache(path).close()
    with sqlite3.connect(path) as conn:
        conn.executemany("INSERT INTO feedback VALUES (?, ?, ?, 0.0)", [
            (cache_digest("t", f"k{i}"), "t", Score(scores=[0.5] * values_per_row).model_dump_json())
            for i in range(rows)])
    conn.close()


def _assert_names_file_and_fix(exc, path) -> None:
    message = str(exc.value)
    assert exc.value.path == path and f"the feedback cache {path} is damaged" in message
    assert f"mv {path} {path}.damaged" in message and "nothing else is lost" in message


@pytest.mark.parametrize("damage", ["junk", "truncated", "header_only"])
def test_a_damaged_cache_file_names_the_file_and_the_fix_on_opening(tmp_path, damage):
    from opd_sdk.errors import CorruptedFile

    path = tmp_path / "c.sqlite"
    _filled_cache(path, 3000)
    data = path.read_bytes()
    assert len(data) > 100_000
    damaged = {"junk": bytes(range(256)) * 20, "truncated": data[: len(data) // 2], "header_only": data[:100]}[damage]
    path.write_bytes(damaged)
    with pytest.raises(CorruptedFile) as exc:
        FeedbackCache(path)
    _assert_names_file_and_fix(exc, path)
    assert path.read_bytes() == damaged  # left as it was, for the user to move aside
    path.rename(tmp_path / "c.sqlite.damaged")  # the fix the message gives
    with FeedbackCache(path) as cache:
        assert len(cache) == 0


def test_a_damaged_page_read_after_opening_names_the_file(tmp_path):
    """Pages damaged on disk while the cache is open (larger than sqlite's 2 MB page cache, so read again)."""
    from opd_sdk.errors import CorruptedFile

    path = tmp_path / "c.sqlite"
    _filled_cache(path, 2000, values_per_row=400)
    cache = FeedbackCache(path)
    with open(path, "r+b") as f:
        f.seek(4096 * 50)
        f.write(b"\xa5" * 4096 * 20)
    errors = []
    for i in range(2000):
        try:
            assert cache.get("t", f"k{i}") == Score(scores=[0.5] * 400)
        except CorruptedFile as exc:
            errors.append(exc)
    assert errors and all(e.path == path and "nothing else is lost" in str(e) for e in errors)
    cache.close()


def test_a_row_that_does_not_parse_is_a_miss_and_the_new_answer_replaces_it(tmp_path, caplog):
    path = tmp_path / "c.sqlite"
    with FeedbackCache(path) as cache:
        cache.put("t", "k", Score(scores=[1.0]))
        cache.put("t", "other", Score(scores=[2.0]))
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE feedback SET feedback = ? WHERE key = ?", ('{"kind": "score", "sco', cache_digest("t", "k")))
    conn.close()
    with FeedbackCache(path) as cache:
        assert cache.get("t", "k") is None
        assert "a row of teacher t does not parse" in caplog.text and str(path) in caplog.text
        assert cache.get("t", "other") == Score(scores=[2.0])
        cache.put("t", "k", Score(scores=[3.0]))
        assert cache.get("t", "k") == Score(scores=[3.0])


def test_a_busy_cache_is_not_called_damaged(tmp_path):
    """A write lock held by another connection past the busy timeout is sqlite's OperationalError, as before."""
    path = tmp_path / "c.sqlite"
    FeedbackCache(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with FeedbackCache(path, busy_timeout_s=0.1) as cache, pytest.raises(sqlite3.OperationalError, match="locked"):
            cache.put("t", "k", Score(scores=[1.0]))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
