"""Feedback throughput of JudgeTeacher against a real vLLM server: FeedbackCollector vs a plain loop.

Both runners judge the same requests (addition questions with right and wrong
student answers) with the same JudgeTeacher, caching off. "sequential loop
over requests" awaits `judge.feedback(request)` one request at a time (a
pointwise judge still scores that request's completions concurrently);
"one call at a time" (pointwise) judges each completion alone, so exactly one
HTTP call is in flight; "collector" hands the whole
list to `FeedbackCollector.collect` (pointwise requests are split into one
call per completion and sent concurrently, up to --concurrency). Prints a
markdown table: completions scored per second, requests per second, API
calls, failures.

Start the server first (`.ci/start_vllm.sh`), then e.g.:

    flock /work/cpu.lock python benchmarks/judge_vllm.py --url http://127.0.0.1:8011/v1
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opd_sdk import Completion, FeedbackCollector, FeedbackFailure, FeedbackRequest  # noqa: E402
from providers import JudgeTeacher  # noqa: E402


def make_requests(n_prompts: int, n_completions: int, seed: int = 0) -> list[FeedbackRequest]:
    rng = random.Random(seed)
    out = []
    for _ in range(n_prompts):
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        answers = [str(a + b if rng.random() < 0.5 else a + b + rng.choice([-2, -1, 1, 2]))
                   for _ in range(n_completions)]
        out.append(FeedbackRequest(prompt=f"What is {a} + {b}? Answer with just the number.",
                                   completions=[Completion(text=t) for t in answers],
                                   privileged=f"The correct answer is {a + b}."))
    return out


async def sequential(judge: JudgeTeacher, requests: list[FeedbackRequest]) -> tuple[float, int, int]:
    calls = failures = 0
    start = time.perf_counter()
    for r in requests:
        try:
            fb = await judge.feedback(r)
            calls += fb.usage.calls
        except Exception:  # counted, not hidden: a plain loop has no retries
            failures += 1
    return time.perf_counter() - start, calls, failures


async def one_call_at_a_time(judge: JudgeTeacher, requests: list[FeedbackRequest]) -> tuple[float, int, int]:
    """Pointwise only: each completion judged alone, strictly one HTTP call in flight."""
    return await sequential(judge, [r.with_completions([c]) for r in requests for c in r.completions])


async def collected(judge: JudgeTeacher, requests: list[FeedbackRequest], concurrency: int) -> tuple[float, int, int]:
    with FeedbackCollector(judge, max_concurrency=concurrency, cache=None, progress=False) as col:
        start = time.perf_counter()
        results = await col.collect(requests)
        elapsed = time.perf_counter() - start
    calls = sum(r.usage.calls for r in results if not isinstance(r, FeedbackFailure))
    return elapsed, calls, sum(isinstance(r, FeedbackFailure) for r in results)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8011/v1")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--completions", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--modes", default="pointwise,listwise")
    args = ap.parse_args()

    requests = make_requests(args.prompts, args.completions)
    n_completions = sum(len(r.completions) for r in requests)
    rows = []
    for mode in args.modes.split(","):
        judge = JudgeTeacher(args.model, base_url=args.url, mode=mode, max_tokens=32)
        await judge.feedback(requests[0])  # warm-up (vLLM compiles the grammar on first use)
        runners = [("sequential loop over requests", lambda: sequential(judge, requests)),
                   (f"FeedbackCollector (concurrency {args.concurrency})",
                    lambda: collected(judge, requests, args.concurrency))]
        if mode == "pointwise":
            runners.insert(0, ("sequential, one call at a time", lambda: one_call_at_a_time(judge, requests)))
        for name, run in runners:
            elapsed, calls, failures = await run()
            rows.append((mode, name, n_completions / elapsed, len(requests) / elapsed, calls, failures, elapsed))
        await judge.endpoint.client.close()

    print(f"JudgeTeacher on vLLM ({args.model}) at {args.url}: {len(requests)} requests x "
          f"{args.completions} completions, caching off\n")
    print("| mode | runner | completions/s | requests/s | HTTP calls | failures | wall s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for mode, name, cps, rps, calls, failures, elapsed in rows:
        print(f"| {mode} | {name} | {cps:.2f} | {rps:.2f} | {calls} | {failures} | {elapsed:.1f} |")
    for mode in dict.fromkeys(r[0] for r in rows):
        *seqs, col = [r for r in rows if r[0] == mode]
        ratios = ", ".join(f"{col[2] / seq[2]:.2f}x vs {seq[1]}" for seq in seqs)
        print(f"\n{mode}: collector {ratios}", end="")
    print()


if __name__ == "__main__":
    asyncio.run(main())
