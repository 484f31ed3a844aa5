"""A persistent feedback cache: a rerun or a resumed run never pays twice.

sqlite in WAL mode, so several processes (and threads) may read and write
one file at once; a busy writer makes others wait (busy timeout) instead of
failing. A row is keyed by sha256(teacher id + "\\n" + cache key) and holds
only that hash, the teacher id and the feedback JSON: never the request
text, never a failure (a failure must be retried by a later run), never a
secret (teacher ids are fingerprints without keys by contract). The file (and
its WAL / shared-memory files) is readable by its owner only (0600).

A damaged file (junk bytes, cut short) raises `CorruptedFile` naming it and the fix, when it opens
(`PRAGMA quick_check`, about 0.1 s for 200 MB) or at the first damaged row read later: move it aside,
and only the answers cached in it are asked (and paid for) again; nothing else is lost.

`collector_cache(teacher, cache)` is the one place the "not cacheable" rule
lives: both collectors (`FeedbackCollector`, `LocalRunner`) open their cache
through it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from opd_sdk.errors import CorruptedFile
from opd_sdk.feedback.teacher import is_cacheable, uncached_reason
from opd_sdk.types import (
    Feedback,
    FeedbackFailure,
    feedback_from_json,
    feedback_to_json,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    key TEXT PRIMARY KEY,
    teacher_id TEXT NOT NULL,
    feedback TEXT NOT NULL,
    created REAL NOT NULL
)
"""

log = logging.getLogger("opd_sdk.feedback.cache")


def cache_digest(teacher_id: str, cache_key: str) -> str:
    return hashlib.sha256(f"{teacher_id}\n{cache_key}".encode()).hexdigest()


def _owner_only(path: Path) -> None:
    """Create the database file readable and writable by its owner only (0600), and tighten an
    existing one (and its WAL / shared-memory files) that we own. SQLite gives the -wal and -shm
    files it creates the database file's permissions."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            if p.exists() and p.stat().st_uid == os.getuid() and p.stat().st_mode & 0o077:
                os.chmod(p, 0o600)
        except (OSError, AttributeError):  # another owner, or no getuid (Windows): leave it
            pass


def _is_damage(exc: sqlite3.DatabaseError) -> bool:
    """SQLITE_CORRUPT or SQLITE_NOTADB (not a busy, read-only or full disk: those are OperationalError)."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python >= 3.11
    if code is None:
        return type(exc) is sqlite3.DatabaseError
    return (code & 0xFF) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def damaged_cache(path: Path, reason: str) -> CorruptedFile:
    """The error for a feedback cache that cannot be read: its file, and how to go on."""
    moves = "; ".join(f"mv {p} {p}.damaged" for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists())
    return CorruptedFile(
        f"the feedback cache {path} is damaged ({reason}); move it aside (`{moves or f'mv {path} {path}.damaged'}`) "
        "and run the same command again: nothing else is lost, only the teacher answers cached in it "
        "are asked (and paid for) again", path)


class FeedbackCache:
    """`get` / `put` feedback by (teacher id, cache key). Thread- and process-safe.

    Raises CorruptedFile (naming the file and the fix) when the file is damaged, on opening or
    on the first damaged row read."""

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _owner_only(self.path)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(self.path), timeout=busy_timeout_s, check_same_thread=False,
                                     isolation_level=None)
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute(_SCHEMA)
            problems = [row[0] for row in self._conn.execute("PRAGMA quick_check(1)").fetchall()]
        except sqlite3.DatabaseError as exc:
            self._conn.close()  # first: the message lists the files left behind
            if _is_damage(exc):
                raise damaged_cache(self.path, str(exc)) from exc
            raise
        if problems != ["ok"]:
            self._conn.close()
            raise damaged_cache(self.path, problems[0].splitlines()[-1])

    @contextlib.contextmanager
    def _damage_named(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.DatabaseError as exc:
            if _is_damage(exc):
                raise damaged_cache(self.path, str(exc)) from exc
            raise

    def __repr__(self) -> str:
        return f"FeedbackCache({str(self.path)!r})"

    def get(self, teacher_id: str, cache_key: str) -> Feedback | None:
        digest = cache_digest(teacher_id, cache_key)
        with self._lock, self._damage_named():
            row = self._conn.execute("SELECT feedback FROM feedback WHERE key = ?", (digest,)).fetchone()
        if row is None:
            return None
        try:
            return feedback_from_json(row[0])
        except ValueError as exc:  # one damaged row: a miss, and the teacher's new answer replaces it
            log.warning("feedback cache %s: a row of teacher %s does not parse (%s); asking the teacher again",
                        self.path, teacher_id, str(exc).splitlines()[0])
            return None

    def put(self, teacher_id: str, cache_key: str, feedback: Feedback) -> bool:
        """Store `feedback`; a FeedbackFailure is never stored (returns False)."""
        if isinstance(feedback, FeedbackFailure):
            return False
        digest = cache_digest(teacher_id, cache_key)
        with self._lock, self._damage_named():
            self._conn.execute(
                "INSERT OR REPLACE INTO feedback (key, teacher_id, feedback, created) VALUES (?, ?, ?, ?)",
                (digest, teacher_id, feedback_to_json(feedback), time.time()),
            )
        return True

    def __len__(self) -> int:
        with self._lock, self._damage_named():
            return self._conn.execute("SELECT COUNT(*) FROM feedback").fetchone()[0]

    def clear(self, teacher_id: str | None = None) -> int:
        """Delete all rows (or one teacher's); return how many were deleted."""
        with self._lock, self._damage_named():
            if teacher_id is None:
                cur = self._conn.execute("DELETE FROM feedback")
            else:
                cur = self._conn.execute("DELETE FROM feedback WHERE teacher_id = ?", (teacher_id,))
        return cur.rowcount

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "FeedbackCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def collector_cache(teacher: Any, cache: FeedbackCache | str | os.PathLike[str] | None,
                    ) -> tuple[FeedbackCache | None, bool]:
    """(the cache a collector of `teacher` uses, whether the collector opened it and so closes it).

    cache: a FeedbackCache (shared: its owner closes it), a path (opened here), or None.
    A teacher that is not cacheable (`opd_sdk.feedback.teacher.is_cacheable`: its answers change
    as the student trains) gets no cache: the one given is ignored, not refused, so a caller may
    pass the run's cache whatever the teacher, and no file is created for it.
    """
    if cache is None:
        return None, False
    if not is_cacheable(teacher):
        log.info("no feedback cache for %s: its answers change as the student trains", teacher.id)
        return None, False
    why = uncached_reason(teacher)
    if why is not None:
        log.warning("no feedback cache for %s: its id cannot cover what determines its answers (%s); "
                    "every answer is asked again on a rerun", teacher.id, why)
        return None, False
    if isinstance(cache, FeedbackCache):
        return cache, False
    return FeedbackCache(cache), True
