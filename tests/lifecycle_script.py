"""Run by tests/train/test_lifecycle.py in a fresh interpreter (-W error): a teacher used
from asyncio.run, from two collectors in turn, and after a collector closed. Exits 0 and
prints nothing to stderr when every HTTP client was released on its own loop."""

from __future__ import annotations

import asyncio
import gc
import sys

unraisable: list[str] = []
sys.unraisablehook = lambda u: unraisable.append(f"{u.exc_type.__name__}: {u.exc_value} ({u.object!r})")


def main() -> int:
    from opd_sdk.feedback.collector import FeedbackCollector
    from opd_sdk.types import Completion, FeedbackRequest, Score
    from providers.judge import JudgeTeacher
    from tests.scripted_server import ScriptedServer

    request = FeedbackRequest(prompt="What is 2+2?", completions=[Completion(text="4"), Completion(text="5")])
    with ScriptedServer(lambda body: '{"score": 7}') as srv:
        judge = JudgeTeacher("judge", base_url=srv.base_url, api_key="sk-test-lifecycle")
        first = asyncio.run(judge.feedback(request))  # a loop that is gone afterwards
        results = []
        for _ in range(2):  # several collectors, one after the other closed
            collector = FeedbackCollector(judge, progress=False)
            results += collector.collect_sync([request])
            collector.close()
        results.append(asyncio.run(judge.feedback(request)))  # again after the collectors closed
        with FeedbackCollector(judge, progress=False) as a, FeedbackCollector(judge, progress=False) as b:
            results += a.collect_sync([request]) + b.collect_sync([request])  # two at once
        del judge, a, b, collector
        gc.collect()
    ok = all(isinstance(r, Score) and r.scores == [0.7, 0.7] for r in [first, *results])
    gc.collect()
    for line in unraisable:
        print("UNRAISABLE", line, file=sys.stderr)
    return 0 if ok and not unraisable else 1


if __name__ == "__main__":
    sys.exit(main())
