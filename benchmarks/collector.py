"""Feedback throughput: FeedbackCollector vs the usual ways of calling a judge.

Against the scripted OpenAI-compatible server (tests/scripted_server.py, run
in its own process so client and server do not share a GIL) with a fixed
latency, a server-side concurrency cap and randomly injected 429/5xx faults,
it measures feedback per second of:

  sequential   a loop over the plain sync `openai` client (its own retries on)
  threads-8    a ThreadPoolExecutor of 8 workers with the sync client (the
               pattern TRL's judges used)
  collector    FeedbackCollector (max_concurrency 2 x cap by default, so a
               queue waits at the server) with a minimal judge on the
               AsyncOpenAI client; and, apart, the collector's own CPU per
               request with a teacher that answers at once

The bound is the server's: cap / latency requests a second. Every answer is
checked against the scripted judge's rule, so "lost" counts missing or wrong
answers (it must be 0).

    python benchmarks/collector.py                      # 250 ms, cap 32, 5% faults
    python benchmarks/collector.py --latency 0.1 --n 1000  # the 100 ms variant

Each method makes one untimed warm-up call first (the openai client imports
its resources lazily on first use). Faulted requests hold a server slot for
the full latency too, so 5% faults cap any client at about 95% of the bound,
and the last retries add a tail (backoff + latency) to the run.

The client's CPU per request (the openai client costs a few ms a call) is
reported too: when cap / latency exceeds what one core can drive, the
bound is out of reach for any single-process Python client, and the table
says so (column "CPU ceiling" = 1 / client CPU seconds per request).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import openai  # noqa: E402

from opd_sdk import Completion, FeedbackCollector, FeedbackRequest, Score  # noqa: E402
from tests.minimal_judge import MinimalJudge, answer_of, judge_prompt  # noqa: E402
from tests.scripted_server import ScriptedServer  # noqa: E402


def score_reply(body: dict) -> str:
    return f"Score: {len(answer_of(body)) % 10}"


def serve(conn, latency: float, cap: int, fault_rate: float, seed: int) -> None:
    """Child process: run the server, answer 'stats' / 'reset' / 'stop' over a pipe."""
    with ScriptedServer(score_reply, latency=latency, max_concurrency=cap, fault_rate=fault_rate,
                        seed=seed) as srv:
        conn.send(srv.base_url)
        while True:
            command = conn.recv()
            if command == "stats":
                faults: dict[str, int] = {}
                for r in srv.requests:
                    faults[r.fault] = faults.get(r.fault, 0) + 1
                conn.send({"count": srv.count, "max_in_flight": srv.max_in_flight,
                           "max_served": srv.max_served, "faults": faults})
            elif command == "reset":
                srv.reset_stats()
                conn.send(True)
            else:
                conn.send(True)
                return


def make_requests(n: int) -> list[FeedbackRequest]:
    return [FeedbackRequest(prompt=f"question {i}", completions=[Completion(text="y" * (i % 9) + f"-{i}")])
            for i in range(n)]


def expected(request: FeedbackRequest) -> float:
    return float(len(request.completions[0].text) % 10)


def sync_call(client: openai.OpenAI, request: FeedbackRequest) -> float | None:
    try:
        reply = client.chat.completions.create(
            model="judge", messages=[{"role": "user", "content": judge_prompt(request, request.completions[0].text)}],
            temperature=0.0)
        return float(reply.choices[0].message.content.split("Score:")[1])
    except Exception:  # counted as lost
        return None


WARM_UP = FeedbackRequest(prompt="warm-up", completions=[Completion(text="warm-up")])


def timed(fn, *args):
    """(result, wall s, CPU s) of fn(*args)."""
    started, cpu_started = time.perf_counter(), time.process_time()
    result = fn(*args)
    return result, time.perf_counter() - started, time.process_time() - cpu_started


def run_sequential(base_url: str, requests: list[FeedbackRequest], reset):
    client = openai.OpenAI(base_url=base_url, api_key="sk-bench", max_retries=5)
    sync_call(client, WARM_UP)  # the openai client imports its resources lazily on first use
    reset()
    return timed(lambda: [sync_call(client, r) for r in requests])


def run_threads(base_url: str, requests: list[FeedbackRequest], reset, workers: int):
    client = openai.OpenAI(base_url=base_url, api_key="sk-bench", max_retries=5)
    sync_call(client, WARM_UP)
    reset()
    with ThreadPoolExecutor(workers) as pool:
        return timed(lambda: list(pool.map(lambda r: sync_call(client, r), requests)))


def run_collector(judge, requests: list[FeedbackRequest], reset, concurrency: int, backoff: float):
    async def go():
        collector = FeedbackCollector(judge, max_concurrency=concurrency, progress=False,
                                      backoff_initial_s=backoff)
        await collector.collect([WARM_UP])
        reset()
        started, cpu_started = time.perf_counter(), time.process_time()
        results = await collector.collect(requests)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        await judge.aclose()
        return [r.scores[0] if isinstance(r, Score) else None for r in results], wall, cpu

    return asyncio.run(go())


class InstantTeacher:
    """Answers at once without HTTP: what is left is the collector's own CPU cost."""

    id = "instant:1"

    async def feedback(self, request: FeedbackRequest) -> Score:
        await asyncio.sleep(0)
        return Score(scores=[expected(request)])


def collector_overhead_ms(n: int, concurrency: int) -> float:
    async def go():
        collector = FeedbackCollector(InstantTeacher(), max_concurrency=concurrency, progress=False)
        await collector.collect([WARM_UP])
        cpu_started = time.process_time()
        results = await collector.collect(make_requests(n))
        assert all(isinstance(r, Score) for r in results)
        return 1000 * (time.process_time() - cpu_started) / n

    return asyncio.run(go())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1600, help="requests for the collector")
    ap.add_argument("--threads-n", type=int, default=400, help="requests for the thread pool")
    ap.add_argument("--seq-n", type=int, default=40, help="requests for the sequential loop (it is slow)")
    ap.add_argument("--latency", type=float, default=0.25)
    ap.add_argument("--cap", type=int, default=32, help="server concurrency cap")
    ap.add_argument("--fault-rate", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--collector-concurrency", type=int, default=None,
                    help="collector's max_concurrency (default 2 x cap: keeps a queue at the server so its "
                         "slots never idle while the client turns a reply into the next request)")
    ap.add_argument("--only-collector", action="store_true", help="skip the two baselines")
    ap.add_argument("--backoff", type=float, default=0.1, help="collector's initial backoff (s)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    parent, child = mp.get_context("fork").Pipe()
    proc = mp.get_context("fork").Process(target=serve, args=(child, args.latency, args.cap, args.fault_rate,
                                                              args.seed), daemon=True)
    proc.start()
    base_url = parent.recv()
    bound = args.cap / args.latency
    rows = []

    def reset() -> None:
        parent.send("reset")
        parent.recv()

    def measure(name: str, concurrency: int, requests, fn):
        scores, wall, cpu = fn(requests)
        lost = sum(s is None or s != expected(r) for s, r in zip(scores, requests)) + len(requests) - len(scores)
        parent.send("stats")
        stats = parent.recv()
        rate = len(requests) / wall
        rows.append((name, concurrency, len(requests), wall, rate, min(bound, concurrency / args.latency),
                     rate / bound, stats["count"], sum(v for k, v in stats["faults"].items() if k != "ok"),
                     stats["max_in_flight"], lost, 1000 * cpu / len(requests)))
        print(f"done: {name} {len(requests)} in {wall:.2f} s", file=sys.stderr)

    conc = args.collector_concurrency or 2 * args.cap
    if not args.only_collector:
        measure("sequential (sync openai)", 1, make_requests(args.seq_n),
                lambda q: run_sequential(base_url, q, reset))
        measure(f"threads-{args.threads} (sync openai)", args.threads, make_requests(args.threads_n),
                lambda q: run_threads(base_url, q, reset, args.threads))
    measure("FeedbackCollector (openai judge)", conc, make_requests(args.n),
            lambda q: run_collector(MinimalJudge(base_url, api_key="sk-bench"), q, reset, conc, args.backoff))
    parent.send("stop")
    parent.recv()
    proc.join(10)

    print(f"\nServer: latency {args.latency * 1000:.0f} ms, concurrency cap {args.cap}, "
          f"{args.fault_rate:.0%} injected faults (429 retry-after 0, 500, 503); "
          f"bound = cap / latency = {bound:.0f} feedback/s.\n")
    print("| method | concurrency | requests | wall s | feedback/s | its own bound | % of server bound "
          "| server saw | faults hit | max in flight | lost | client CPU ms/req | CPU ceiling /s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, conc, n, wall, rate, own, frac, seen, faults, inflight, lost, cpu_ms in rows:
        print(f"| {name} | {conc} | {n} | {wall:.2f} | {rate:.1f} | {own:.0f} | {frac:.1%} | {seen} | {faults} "
              f"| {inflight} | {lost} | {cpu_ms:.2f} | {1000 / cpu_ms:.0f} |")
    overhead = collector_overhead_ms(args.n, conc)
    print(f"\nThe collector's own CPU cost (a teacher that answers at once, no HTTP): {overhead:.2f} ms "
          "a request; the rest of the client CPU above is the openai client.")


if __name__ == "__main__":
    main()
