"""Collect teacher feedback for a whole dataset offline: JSONL in, JSONL out, fast and resumable.

Input: one JSON object a line with `prompt` (text or chat messages) and
`completions` (list of strings) or `completion` (one string); optional
`answer` (for a verifier) and `privileged` (teacher-only context).
Output: one line per input line, {"index": i, "feedback": {...}} where
feedback is a Score / Preference / Reference / TokenLogprobs or a
FeedbackFailure (kind "failure": the reason, never a fake score).

Fast: requests go out concurrently through `FeedbackCollector`
(--concurrency, --rpm, --tpm), retried on 429/5xx/timeouts with Retry-After
honoured. Resumable: lines already in the output are skipped, every answer
is also in the sqlite cache, so a crash or Ctrl-C loses nothing paid for.
--retry-failures asks again for lines whose feedback failed (the newest
line for an index wins).

python examples/collect_feedback.py in.jsonl out.jsonl --teacher judge --base-url http://127.0.0.1:8000/v1 --teacher-model smollm2
python examples/collect_feedback.py in.jsonl out.jsonl --teacher verifier
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from opd_sdk import FeedbackRequest, make_collector
from opd_sdk.types import Completion, FeedbackFailure, feedback_to_json


def make_teacher(args: argparse.Namespace):
    key = os.environ.get(args.api_key_env)
    if args.teacher == "verifier":
        from providers.verifier import VerifierTeacher

        return VerifierTeacher("numeric")
    if args.teacher == "judge":
        from providers.judge import JudgeTeacher

        return JudgeTeacher(args.teacher_model, rubric=args.rubric, base_url=args.base_url, api_key=key)
    if args.teacher == "preference":
        from providers.preference import PreferenceTeacher

        return PreferenceTeacher(args.teacher_model, base_url=args.base_url, api_key=key)
    from providers.reference import ReferenceTeacher

    return ReferenceTeacher(args.teacher_model, n=1, base_url=args.base_url, api_key=key)


def read_requests(path: Path) -> list[FeedbackRequest]:
    requests = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            texts = row.get("completions") or ([row["completion"]] if "completion" in row else [""])
            metadata = {"answer": str(row["answer"])} if row.get("answer") is not None else {}
            requests.append(
                FeedbackRequest(
                    prompt=row["prompt"],
                    completions=[Completion(text=t) for t in texts],
                    privileged=row.get("privileged"),
                    metadata=metadata,
                )
            )
    return requests


def finished(path: Path, retry_failures: bool) -> set[int]:
    """Indices already in the output (failed ones too, unless retry_failures)."""
    done: dict[int, bool] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                done[row["index"]] = row["feedback"]["kind"] != "failure"
    return {i for i, ok in done.items() if ok or not retry_failures}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--teacher", choices=["judge", "verifier", "preference", "reference"], default="judge")
    p.add_argument("--base-url", default=None)
    p.add_argument("--teacher-model", default="gpt-4o-mini", help="the served teacher model name")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY")
    p.add_argument("--rubric", default="Is the answer correct, concise and helpful?")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rpm", type=float, default=None)
    p.add_argument("--tpm", type=float, default=None)
    p.add_argument("--budget-usd", type=float, default=None)
    p.add_argument("--cache", default=None, help="sqlite cache (default: OUTPUT.cache.sqlite)")
    p.add_argument("--chunk", type=int, default=256, help="lines written per batch")
    p.add_argument("--retry-failures", action="store_true")
    args = p.parse_args(argv)

    requests = read_requests(args.input)
    done = finished(args.output, args.retry_failures)
    todo = [i for i in range(len(requests)) if i not in done]
    cache = args.cache or str(args.output) + ".cache.sqlite"
    collector = make_collector(
        make_teacher(args), max_concurrency=args.concurrency, rpm=args.rpm, tpm=args.tpm,
        budget_usd=args.budget_usd, cache=cache,
    )
    start = time.perf_counter()
    failures = 0
    try:
        with args.output.open("a", encoding="utf-8") as out:
            for first in range(0, len(todo), args.chunk):
                chunk = todo[first : first + args.chunk]
                for i, fb in zip(chunk, collector.collect_sync([requests[i] for i in chunk])):
                    failures += isinstance(fb, FeedbackFailure)
                    out.write(json.dumps({"index": i, "feedback": json.loads(feedback_to_json(fb))}) + "\n")
                out.flush()
    finally:
        collector.close()
    u = collector.usage
    seconds = time.perf_counter() - start
    print(f"{len(todo)} collected ({len(done)} already done) in {seconds:.1f}s: {u.requests_sent} sent, "
          f"{u.cache_hits} from cache, {u.retries} retries, {failures} failures -> {args.output}")
    return {"collected": len(todo), "skipped": len(done), "failures": failures, "usage": u}


if __name__ == "__main__":
    main()
