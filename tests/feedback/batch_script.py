"""A process that collects judge scores in mode="batch" (tests/feedback/test_collector_batch.py
kills it while its batch is pending, then resumes the collection in the test's own process).

    python -m tests.feedback.batch_script BASE_URL CACHE_PATH
"""

from __future__ import annotations

import json
import sys

from opd_sdk.feedback.collector import FeedbackCollector
from opd_sdk.types import Completion, FeedbackRequest
from providers.judge import JudgeTeacher

POLL_S = (0.05, 0.1)


def judge(base_url: str) -> JudgeTeacher:
    return JudgeTeacher("judge-m", base_url=base_url, api_key="sk-batch-test-key", structured="none")


def requests() -> list[FeedbackRequest]:
    return [FeedbackRequest(prompt=f"What is {i} + {i}?", completions=[Completion(text=str(2 * i))])
            for i in range(4)]


if __name__ == "__main__":
    base_url, cache = sys.argv[1:3]
    with FeedbackCollector(judge(base_url), mode="batch", cache=cache, batch_poll_s=POLL_S, progress=False) as col:
        out = col.collect_sync(requests())
    print(json.dumps([f.model_dump(mode="json") for f in out]))
